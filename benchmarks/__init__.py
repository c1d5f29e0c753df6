"""Benchmarks for roundtrip: ``python -m benchmarks.run`` (see docs/benchmarks.md)."""
