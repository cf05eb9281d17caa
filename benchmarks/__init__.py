"""Benchmarks: measurements against baselines run in the same process tree (see README.md)."""
