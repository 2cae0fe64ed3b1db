"""Validation against published measurements: predictions from profile facts, never fitted."""
