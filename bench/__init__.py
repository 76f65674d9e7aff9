"""Benchmarks: ``walmirror bench`` (``append``: append latency, ingest, heal to first
delivery), ``--drain`` (``drain``), ``--scale`` (``scale``: 1M entries queued, then
drained) and ``--scenario`` (``scenarios``). See docs/benchmarks.md."""
