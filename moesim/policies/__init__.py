"""Swappable strategies: pure functions over arrays, one registry per family.

Families and where their registries live:

- ``placement``: :data:`moesim.policies.placement.PLACEMENTS`
- ``replica choice``: :data:`moesim.policies.replicas.REPLICA_CHOICES`
- ``drop policy``: :data:`moesim.policies.capacity.DROP_POLICIES`
- ``cache policy`` / ``prefetch``: :mod:`moesim.policies.offload`
- ``gating``: :data:`moesim.policies.gating.GATINGS`
- ``routing source``: :data:`moesim.routing.sources.SOURCES` (filled by
  :mod:`moesim.routing.catalog`)
- ``all-to-all``: :data:`moesim.comm.alltoall.ALL_TO_ALL`
"""

from __future__ import annotations

import importlib
from typing import Any

from moesim.registry import Registry

FAMILIES: dict[str, tuple[str, str, str]] = {
    "routing source": ("routing.source", "moesim.routing.catalog", "SOURCES"),
    "gating": ("policies.gating.type", "moesim.policies.gating", "GATINGS"),
    "drop policy": ("policies.capacity.drop", "moesim.policies.capacity", "DROP_POLICIES"),
    "placement": ("policies.placement.type", "moesim.policies.placement", "PLACEMENTS"),
    "replica choice": (
        "policies.placement.replica_choice",
        "moesim.policies.replicas",
        "REPLICA_CHOICES",
    ),
    "all-to-all": ("policies.all_to_all.type", "moesim.comm.alltoall", "ALL_TO_ALL"),
    "cache policy": ("policies.offload.policy", "moesim.policies.offload", "CACHE_POLICIES"),
    "prefetch": ("policies.offload.prefetch", "moesim.policies.offload", "PREFETCHERS"),
}
"""Every policy family: the scenario field that names one, and the module and registry that
hold them. Adding a family is one row here; adding a policy is one object in its registry."""


def registry_for(family: str) -> Registry[Any]:
    """The registry of a policy family (imported on first use), by the name its errors use."""
    _, module, attribute = FAMILIES[family]
    registry: Registry[Any] = getattr(importlib.import_module(module), attribute)
    return registry
