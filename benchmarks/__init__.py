"""Measurements outside the installed package (`python -m benchmarks.NAME`); their runs are in BENCHMARKS.md."""
