"""Benchmark suites (pytest-benchmark) and ``python -m bench``, the report built from them."""
