"""The instances of a serving scenario (``workload.mode: serve``) as scenarios of their own.

The scenario's cluster, hardware, parallelism and policies describe its decode instances
(``dp`` of them); ``serving.prefill`` describes a pool of prefill instances (its own nodes,
parallelism, hardware profile, all-to-all, overlap, CUDA graphs; the rest as the scenario's).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from moesim.config.resolved import ResolvedScenario
from moesim.config.scenario import Scenario
from moesim.hardware.catalog import load_profile
from moesim.hardware.profile import HardwareProfile


def prefill_pool(r: ResolvedScenario) -> ResolvedScenario | None:
    """The whole prefill pool (``dp`` instances) of a disaggregated scenario, or None.

    Raises:
        ConfigError: its hardware profile cannot be loaded.
    """
    s = r.scenario
    pool = None if s.serving is None else s.serving.prefill
    if pool is None:
        return None
    hw: HardwareProfile = r.hardware
    if pool.hardware is not None:
        hw = load_profile(pool.hardware, None if r.path is None else Path(r.path).parent)
    pol = s.policies.model_copy(
        update={
            "all_to_all": pool.all_to_all or s.policies.all_to_all,
            "overlap": pool.overlap or s.policies.overlap,
        }
    )
    pre: Scenario = s.model_copy(
        update={
            "parallelism": pool.parallelism,
            "cluster": s.cluster.model_copy(update={"nodes": pool.nodes}),
            "policies": pol,
            "hardware": hw.name,
            "workload": s.workload.model_copy(update={"cuda_graphs": pool.cuda_graphs}),
        }
    )
    return dataclasses.replace(r, scenario=pre, hardware=hw)


def one_instance(r: ResolvedScenario) -> ResolvedScenario:
    """One of the ``dp`` instances of a pool: ``dp`` 1 on its share of the nodes."""
    s = r.scenario
    par = s.parallelism
    nodes = max(1, s.cluster.nodes // par.dp)
    one = s.model_copy(
        update={
            "parallelism": par.model_copy(update={"dp": 1}),
            "cluster": s.cluster.model_copy(update={"nodes": nodes}),
        }
    )
    return dataclasses.replace(r, scenario=one)


def pools(r: ResolvedScenario) -> tuple[ResolvedScenario, ResolvedScenario | None]:
    """One decode instance's scenario and, disaggregated, one prefill instance's."""
    pre = prefill_pool(r)
    return one_instance(r), None if pre is None else one_instance(pre)
