"""``--set key.path=value`` overrides applied to a parsed scenario before validation."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from moesim.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], parsed value); values parse as YAML."""
    if "=" not in text:
        raise ConfigError(None, "--set", f"expected key.path=value, got '{text}'")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(None, "--set", f"empty key in '{text}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each override set (creating sections as needed)."""
    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(None, where, f"--set {text}: '{where}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return out
