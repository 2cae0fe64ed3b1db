"""The ``moesim`` command line. Library code never prints; this package does."""

from moesim.cli.app import app, main

__all__ = ["app", "main"]
