"""Scenario files: typed models, YAML loading, command-line overrides and clear errors."""
