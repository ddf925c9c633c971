"""Benchmarks: runnable modules (``python -m bench.<name>``), not tests."""
