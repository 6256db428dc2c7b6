"""Benchmarks: teacher-forced quality against eviction baselines, and speed of the split design.

`positronic bench quality` and `positronic bench speed` (cli.py); results and method in
docs/benchmarks.md.
"""
