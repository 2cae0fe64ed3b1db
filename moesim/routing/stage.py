"""The routing stage: per step, every replica's MoE-layer counts, computed on arrays.

Work proportional to tokens happens here, in numpy, a chunk of layers at a time (a chunk holds
at most :data:`CHUNK_ASSIGNMENTS` assignments so memory stays bounded for 64-GPU prefills).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from moesim.config.scenario import Scenario
from moesim.models.spec import ModelSpec
from moesim.policies.placement import Placement, make_placement
from moesim.routing.batch import TokenBatch, make_batch
from moesim.routing.dispatch import CapacityRule, LayerCounts, count_layers
from moesim.routing.sources import SOURCES, RoutingSource

CHUNK_ASSIGNMENTS = 1 << 22


@dataclass(frozen=True)
class StepRouting:
    """One step's routing outcome: ``replicas[r]`` holds the counts of replica ``r``.

    Every array in a :class:`LayerCounts` has the MoE layers as its first axis.
    """

    batch: TokenBatch
    replicas: list[LayerCounts]


class RoutingStage:
    """Draws and counts the routing of each step of a scenario.

    Args:
        scenario: The validated scenario.
        model: Its model.
        gpus_per_node: From the hardware profile.
        rng: The routing stage's random generator.
    """

    def __init__(
        self, scenario: Scenario, model: ModelSpec, gpus_per_node: int, rng: np.random.Generator
    ) -> None:
        self.scenario, self.model, self.rng = scenario, model, rng
        par = scenario.parallelism
        self.source: RoutingSource = SOURCES.get(scenario.routing.source)(
            scenario.routing, model, rng
        )
        loads = self.source.expected_loads()
        self.placement: Placement = make_placement(scenario.policies.placement.type, loads, par.ep)
        self.log2phy = self.placement.log2phy(model.moe.num_experts)
        self.logcnt = self.placement.logcnt(model.moe.num_experts)
        cap = scenario.policies.capacity
        self.rule = CapacityRule(
            factor=cap.factor if cap.type == "capacity" else None,
            drop=cap.drop,
            num_experts=model.moe.num_experts,
            top_k=model.moe.top_k,
        )
        self.rank_node = np.array(par.rank_nodes(gpus_per_node))

    def batch(self, step: int, replica: int = 0) -> TokenBatch:
        """The tokens of ``step`` on each EP rank of data-parallel replica ``replica``.

        Sequence ids are global: decode keeps a replica's sequences from step to step, prefill
        and training take new sequences every step.
        """
        w, par = self.scenario.workload, self.scenario.parallelism
        seqs = w.batch_size // par.ep
        if w.mode == "decode":
            return make_batch(par.ep, seqs, 1, w.context_len + step, replica * w.batch_size)
        first = (step * par.dp + replica) * w.batch_size
        return make_batch(par.ep, seqs, w.seq_len, 0, first)

    def step(self, step: int) -> StepRouting:
        """Draw and count step ``step`` for every replica."""
        batches = [self.batch(step, r) for r in range(self.scenario.parallelism.dp)]
        n_moe = len(self.model.moe_layers)
        per_layer = batches[0].ranks * batches[0].tokens_per_rank * self.model.moe.top_k
        chunk = max(1, CHUNK_ASSIGNMENTS // max(per_layer, 1))
        replicas = []
        for batch in batches:
            parts = []
            for start in range(0, n_moe, chunk):
                layers = np.arange(start, min(n_moe, start + chunk))
                draw = self.source.draw(
                    step, layers, batch, self.rng, with_weights=self.rule.factor is not None
                )
                parts.append(
                    count_layers(
                        draw,
                        layers,
                        self.placement,
                        self.log2phy,
                        self.logcnt,
                        self.rule,
                        self.rank_node,
                    )
                )
            replicas.append(_concat(parts))
        return StepRouting(batch=batches[0], replicas=replicas)


def _concat(parts: list[LayerCounts]) -> LayerCounts:
    if len(parts) == 1:
        return parts[0]
    return LayerCounts(
        **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(LayerCounts)}
    )
