"""A scenario with its model and hardware resolved: what every later stage reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moesim.config.scenario import Scenario
from moesim.hardware.profile import HardwareProfile
from moesim.models.spec import ModelSpec, slots_per_rank


@dataclass(frozen=True)
class ResolvedScenario:
    """A validated scenario with its model and hardware resolved.

    Attributes:
        scenario: The validated scenario.
        model: The model description.
        hardware: The hardware profile.
        path: The scenario file (None when built in code).
    """

    scenario: Scenario
    model: ModelSpec
    hardware: HardwareProfile
    path: Path | None = None

    @property
    def world(self) -> int:
        """GPUs in the scenario."""
        return self.scenario.parallelism.world

    @property
    def slots_per_rank(self) -> int:
        """Physical expert slots on each EP rank: (experts + redundant) / ep."""
        return slots_per_rank(
            self.model.moe.num_experts,
            self.scenario.policies.placement.redundant_experts,
            self.scenario.parallelism.ep,
        )

    @property
    def gpus_per_node(self) -> int:
        """GPUs per node, from the hardware profile."""
        return self.hardware.node.gpus_per_node
