"""Benchmarks: each prints a table naming the card and the baseline measured in the same run.

Run from the repository root as modules: ``python -m benchmarks.<name> --help``.
"""
