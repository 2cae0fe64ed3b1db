"""Metrics gathered through hooks while the engine runs; the library never prints them."""
