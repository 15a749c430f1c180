"""Benchmarks behind the `hfs bench-*` commands."""
