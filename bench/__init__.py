"""Benchmarks: ``walmirror bench``."""
