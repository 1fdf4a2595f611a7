"""Benchmarks and profiles; the library imports them only for `python -m runner bench`."""
