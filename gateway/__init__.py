"""Polygate: a multi-protocol message gateway with pluggable auth providers."""

__version__ = "0.1.0"
