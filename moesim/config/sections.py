"""The scenario's sections that a serving pool shares with the scenario itself: the cluster,
the parallel layout, the all-to-all and the overlap (:mod:`moesim.config.scenario` holds the
rest, :mod:`moesim.config.serving` the serving sections).

Layout of the GPUs of a scenario: ``world = pp * dp * ep * tp``, in Megatron-Core's order
(``tp-ep-dp-pp``: tensor parallelism fastest, then expert, then data parallelism, then pipeline
stages). GPU ``g`` belongs to pipeline stage ``g // (dp * ep * tp)``, data-parallel replica
``(g // (ep * tp)) % dp``, expert-parallel rank ``(g // tp) % ep`` and tensor-parallel rank
``g % tp``; consecutive GPUs fill a node first, so a stage's GPUs share nodes and the
stages' activations cross between nodes. Each EP rank (a TP group of ``tp`` GPUs) runs
attention for ``batch_size / ep`` sequences; experts are spread over the ``ep`` ranks and each
expert is sliced ``tp`` ways (expert tensor parallelism equal to tp).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_NODES = 4096
"""Most nodes a scenario may describe (32,768 GPUs of 8)."""
MAX_GPUS = 32_768
"""Most GPUs in any one parallel dimension."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Cluster(Section):
    """How many nodes of the hardware profile."""

    nodes: int = Field(1, ge=1, le=MAX_NODES, description="Nodes in the cluster.")


class Parallelism(Section):
    """Parallel layout; world size = pp * dp * ep * tp.

    As Megatron-Core derives them: the dense (attention) data-parallel group of a stage is its
    ``ep * dp`` GPUs of one TP position, expert data parallelism is ``dp`` and expert tensor
    parallelism equals ``tp``.
    """

    ep: int = Field(1, ge=1, le=MAX_GPUS, description="Expert-parallel ranks per replica.")
    tp: int = Field(
        1, ge=1, le=64, description="Tensor-parallel GPUs per EP rank (attention and experts)."
    )
    dp: int = Field(1, ge=1, le=MAX_GPUS, description="Independent data-parallel replicas.")
    pp: int = Field(
        1, ge=1, le=256, description="Pipeline stages (training): each holds a run of layers."
    )
    vpp: int = Field(
        1,
        ge=1,
        le=64,
        description="Virtual stages per pipeline stage (interleaved 1F1B): the layers are cut "
        "into pp * vpp chunks, chunk c on stage c % pp.",
    )
    pp_layout: list[int] | None = Field(
        None,
        min_length=2,
        max_length=4096,
        description="Layers of each chunk in model order (pp * vpp entries, or pp for "
        "DualPipe), summing to the model's layers. Default: as even as possible, the first "
        "and last chunks (embedding, output layer) taking the shortfall.",
    )

    @property
    def stage_world(self) -> int:
        """GPUs of one pipeline stage."""
        return self.dp * self.ep * self.tp

    @property
    def world(self) -> int:
        """GPUs in the scenario."""
        return self.pp * self.stage_world

    @model_validator(mode="after")
    def _layout(self) -> Parallelism:
        if self.vpp > 1 and self.pp < 2:
            raise ValueError("vpp > 1 needs pp > 1")
        if self.pp_layout is not None and min(self.pp_layout) < 1:
            raise ValueError("pp_layout entries must be >= 1 layer")
        return self

    def rank_nodes(self, gpus_per_node: int) -> list[int]:
        """Node of each EP rank, counted from the first node of its replica."""
        return [(rank * self.tp) // gpus_per_node for rank in range(self.ep)]


class AllToAll(Section):
    """The dispatch/combine communication algorithm."""

    type: str = Field(
        "direct",
        description="All-to-all algorithm (registry name): direct, pxn, hierarchical, "
        "low_latency, allgather.",
    )


class Overlap(Section):
    """Overlapping communication with computation."""

    shared_experts: bool = Field(
        False,
        description="Compute the shared experts on the compute stream while the dispatch "
        "all-to-all is in flight (forward), instead of after the routed experts.",
    )
    comm_sms: Literal["in_flight", "persistent"] = Field(
        "in_flight",
        description="in_flight: communication kernels take gpu.comm_sms SMs from overlapping "
        "compute only while they run; persistent: they hold them for the whole step (DeepEP "
        "normal kernels in training and prefill), so compute always runs on the rest.",
    )
    micro_batches: int = Field(
        1,
        ge=1,
        le=2,
        description="2: two-batch overlap (DeepSeek-V3 / SGLang TBO). Each step's sequences "
        "split into two micro-batches with their own routing counts, capacity and "
        "collectives; both walk the layers at once on one compute stream, so one's "
        "all-to-all runs while the other computes.",
    )
