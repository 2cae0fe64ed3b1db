"""Swappable strategies: pure functions over arrays, one registry per family.

Families and where their registries live:

- ``placement``: :data:`moesim.policies.placement.PLACEMENTS`
- ``replica choice``: :data:`moesim.policies.replicas.REPLICA_CHOICES`
- ``drop policy``: :data:`moesim.policies.capacity.DROP_POLICIES`
- ``cache policy`` / ``prefetch``: :mod:`moesim.policies.offload`
- ``gating``: :data:`moesim.policies.gating.GATINGS`
- ``routing source``: :data:`moesim.routing.sources.SOURCES`
- ``all-to-all``: :data:`moesim.comm.alltoall.ALL_TO_ALL`
"""

from __future__ import annotations

from typing import Any

from moesim.registry import Registry

FAMILIES = (
    "placement",
    "drop policy",
    "replica choice",
    "cache policy",
    "prefetch",
    "gating",
    "routing source",
    "all-to-all",
)
"""Every policy family, by the name its errors use."""


def registry_for(family: str) -> Registry[Any]:
    """The registry of a policy family, by the name used in error messages."""
    if family == "placement":
        from moesim.policies.placement import PLACEMENTS

        return PLACEMENTS
    if family == "drop policy":
        from moesim.policies.capacity import DROP_POLICIES

        return DROP_POLICIES
    if family == "replica choice":
        from moesim.policies.replicas import REPLICA_CHOICES

        return REPLICA_CHOICES
    if family in ("cache policy", "prefetch"):
        from moesim.policies.offload import CACHE_POLICIES, PREFETCHERS

        return CACHE_POLICIES if family == "cache policy" else PREFETCHERS
    if family == "gating":
        from moesim.policies.gating import GATINGS

        return GATINGS
    if family == "routing source":
        from moesim.routing.sources import SOURCES

        return SOURCES
    if family == "all-to-all":
        from moesim.comm.alltoall import ALL_TO_ALL

        return ALL_TO_ALL
    raise KeyError(family)
