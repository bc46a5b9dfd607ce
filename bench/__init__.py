"""Benchmarks run by hand: `python -m bench mqtt --help`.

Speed is measured here against peers started in the same run, never by timed
assertions in the test suite.
"""
