"""Helpers of ``benchmarks/compare.py``: suites, methods, measurement in worker processes, reports."""
