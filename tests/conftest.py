"""Shared fixtures: paths of the repository and a small scenario factory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ROOT / "scenarios"


def small_scenario(**overrides: Any) -> dict[str, Any]:
    """A tiny valid scenario as a dict (Mixtral on one H100 node, 2 decode steps)."""
    data: dict[str, Any] = {
        "name": "tiny",
        "model": "mixtral-8x7b",
        "hardware": "h100-sxm",
        "cluster": {"nodes": 1},
        "parallelism": {"ep": 8, "tp": 1, "dp": 1},
        "workload": {"mode": "decode", "batch_size": 64, "context_len": 512, "steps": 2},
        "routing": {"source": "synthetic", "generator": "uniform"},
        "seed": 0,
    }
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return data


@pytest.fixture
def write_scenario(tmp_path: Path):
    """Write a scenario dict to a YAML file in tmp_path and return its path."""

    def write(data: dict[str, Any], name: str = "scenario.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return path

    return write


def strict_json(text: str) -> Any:
    """Parse JSON, rejecting NaN and Infinity (which Python's json accepts by default)."""

    def reject(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=reject)


@pytest.fixture
def clean_registries():
    """Every policy registry as it was before the test (tests that register clean up)."""
    from moesim.policies import FAMILIES, registry_for

    registries = [registry_for(f) for f in FAMILIES]
    saved = [dict(r._items) for r in registries]
    yield
    for registry, items in zip(registries, saved, strict=True):
        registry._items.clear()
        registry._items.update(items)
