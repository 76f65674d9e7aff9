"""Backends: one module per destination, each a full offset-aware ``SessionStore``."""
