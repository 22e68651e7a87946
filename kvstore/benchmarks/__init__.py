"""Benchmarks shipped with the package (``kvstore bench ...``)."""
