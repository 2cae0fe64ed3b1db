"""The scenario file, as typed immutable pydantic models.

Every numeric field carries its unit in its name where it has one, and a description. Policy
sections choose their variant with ``type:``; the names are checked against the policy
registries when a scenario is resolved (:func:`moesim.config.loading.name_errors`), so a new
policy needs no change here.

The GPUs' layout is described in :mod:`moesim.config.sections`; the serving sections are in
:mod:`moesim.config.serving`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moesim.config.sections import (
    AllToAll,
    Cluster,
    Overlap,
    Parallelism,
)
from moesim.config.sections import Section as _Section
from moesim.config.serving import Serving
from moesim.dtypes import DType


class Workload(_Section):
    """What the cluster runs."""

    mode: Literal["decode", "prefill", "train", "serve"] = Field(
        description="Inference decode, prefill, a training step, or serving requests "
        "(the serving section)."
    )
    batch_size: int = Field(
        ge=1,
        le=2**24,
        description="Sequences per replica per step (split over the ep ranks); serve: the "
        "most requests an instance decodes at once.",
    )
    seq_len: int = Field(0, ge=0, le=2**24, description="Tokens per sequence (prefill and train).")
    context_len: int = Field(
        0, ge=0, le=2**27, description="KV-cache length at the first decode step."
    )
    steps: int = Field(
        1,
        ge=1,
        le=100_000,
        description="Decode steps, prefill batches or training steps to simulate.",
    )
    dtype: DType = Field("bf16", description="Weight and compute dtype.")
    dispatch_dtype: DType = Field(
        "bf16", description="Dtype of tokens sent to experts (fp8 adds 1 scale per 128)."
    )
    combine_dtype: DType = Field("bf16", description="Dtype of expert outputs sent back.")
    gradient_dtype: DType = Field(
        "bf16",
        description="Dtype of the gradients the backward all-to-alls carry (training); fp8 "
        "adds 1 scale per 128, as FP8 training recipes may send them.",
    )
    attention_dtype: DType = Field(
        "bf16",
        description="Dtype of the attention core (FlashAttention / FlashMLA); fp8 for FP8 "
        "attention. Projections use dtype.",
    )
    cuda_graphs: bool = Field(
        False,
        description="Kernels are replayed from CUDA graphs (decode in SGLang, vLLM): no "
        "per-kernel launch cost.",
    )
    micro_batches: int = Field(
        1,
        ge=1,
        le=65_536,
        description="Micro-batches per training step (gradient accumulation), each of "
        "batch_size sequences per replica; the global batch is batch_size * dp * "
        "micro_batches sequences. Pipeline stages work on different micro-batches at once.",
    )
    recompute: Literal["none", "selective", "full"] = Field(
        "none",
        description="Activation recompute in training: selective re-runs the attention core, "
        "the MLA up-projections and the SwiGLU activations in the backward pass; full re-runs "
        "every forward op.",
    )

    @model_validator(mode="after")
    def _mode_fields(self) -> Workload:
        if self.mode in ("prefill", "train") and self.seq_len <= 0:
            raise ValueError(f"mode {self.mode} needs seq_len > 0")
        if self.mode == "decode" and self.context_len <= 0:
            raise ValueError("mode decode needs context_len > 0")
        if self.micro_batches > 1 and self.mode != "train":
            raise ValueError("micro_batches > 1 is for mode train (gradient accumulation)")
        return self


class Routing(_Section):
    """Where token-to-expert assignments come from."""

    source: str = Field(
        "synthetic", description="Routing source (registry name): synthetic, or trace (replay)."
    )
    generator: Literal["uniform", "zipf", "dirichlet", "group_limited", "fitted"] = Field(
        "uniform",
        description="Synthetic generator; group_limited uses the model's n_group/topk_group "
        "on DeepEP's benchmark scores; fitted reproduces the loads and cross-layer affinity "
        "of `fit`.",
    )
    skew: float = Field(
        1.0, ge=0, le=4, description="Zipf exponent of expert popularity (zipf only)."
    )
    alpha: float = Field(
        1.0,
        ge=1e-3,
        le=1e3,
        description="Dirichlet concentration of expert popularity (dirichlet only).",
    )
    path: str | None = Field(
        None,
        max_length=4096,
        description="Trace to replay (source trace), relative to the scenario file.",
    )
    fit: str | None = Field(
        None,
        max_length=4096,
        description="Trace (.parquet) or published counts (.json) the fitted generator is "
        "fitted to, relative to the scenario file.",
    )
    trace_steps: tuple[int, int] | None = Field(
        None,
        description="Replay only trace rows whose step is in [first, last] (e.g. the "
        "after-training rows of a trace captured during training).",
    )
    domain: str | None = Field(
        None, max_length=200, description="Domain of the counts file (fitted only)."
    )
    layer_map: Literal["exact", "stretch"] = Field(
        "exact",
        description="exact: the trace is of a model with as many MoE layers as this one; "
        "stretch: map the trace's layers onto the model's by relative depth.",
    )

    @model_validator(mode="after")
    def _needs_file(self) -> Routing:
        if self.source == "trace" and not self.path:
            raise ValueError("source trace needs path: (the trace file to replay)")
        if self.generator == "fitted" and self.source == "synthetic" and not self.fit:
            raise ValueError("generator fitted needs fit: (a trace or a counts JSON)")
        return self


class Capacity(_Section):
    """Expert capacity and what happens to tokens over it."""

    type: Literal["dropless", "capacity"] = Field(
        "dropless", description="dropless, or a capacity factor."
    )
    factor: float | None = Field(
        None, gt=0, le=1000, description="Capacity factor (type capacity)."
    )
    drop: str = Field(
        "position",
        description="Which assignments are dropped when an expert is full: position (latest "
        "tokens), probs (lowest gate weights), random, reroute (to the next choice with room: "
        "by the trace's router logits or the re-gating scores where there are any, else drawn "
        "from the layer's popularity).",
    )
    scope: Literal["rank", "global"] = Field(
        "rank",
        description="Capacity counted per EP rank before the exchange (Megatron) or over the "
        "whole EP group.",
    )
    pad: bool = Field(
        False, description="Pad every expert to its capacity (padding computed and sent)."
    )
    reroute_depth: int = Field(
        4, ge=1, le=64, description="Next choices a dropped assignment tries (drop: reroute)."
    )

    @model_validator(mode="after")
    def _factor(self) -> Capacity:
        if self.type == "capacity" and self.factor is None:
            raise ValueError("type capacity needs a factor (e.g. factor: 1.25)")
        if self.pad and self.type != "capacity":
            raise ValueError("pad needs type capacity (a dropless expert has no capacity)")
        return self


class Placement(_Section):
    """How experts and their replicas map onto EP ranks."""

    type: str = Field("contiguous", description="Placement policy (registry name).")
    redundant_experts: int = Field(
        0,
        ge=0,
        le=2**15,
        description="Extra expert slots per layer over the EP group (eplb, eplb_global, "
        "topology_aware); (experts + redundant) must split evenly over the ranks.",
    )
    num_groups: int | None = Field(
        None,
        ge=1,
        le=2**15,
        description="Expert groups for eplb (default: the model's n_group, or 1).",
    )
    replica_choice: str | None = Field(
        None,
        description="Which replica a token uses: round_robin, least_loaded, nearest "
        "(default: the one the placement is meant for: nearest for topology_aware, else "
        "round_robin).",
    )
    rebalance_every_steps: int = Field(
        0,
        ge=0,
        le=100_000,
        description="Re-place every N steps from a moving average of observed loads, "
        "charging the moved experts' bytes on the network (0: never).",
    )
    load_decay: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Weight of the old average in the moving average of loads (rebalancing).",
    )


class Offload(_Section):
    """Expert offload: experts in host memory, an HBM cache of some of them per GPU."""

    type: Literal["none", "cache"] = Field(
        "none", description="none, or cache (experts in host memory behind an HBM cache)."
    )
    cache_experts: int | None = Field(
        None,
        ge=1,
        le=2**24,
        description="Expert copies the HBM cache of one GPU holds (all layers).",
    )
    cache_gib: float | None = Field(
        None, gt=0, le=2**20, description="HBM for the cache in GiB (instead of cache_experts)."
    )
    policy: str = Field("lru", description="Eviction policy: lru, lfu, belady (optimal bound).")
    prefetch: str = Field(
        "none",
        description="Prefetch of the next layer's experts: none, affinity (from cross-layer "
        "affinity), oracle (the actual next layer: a bound).",
    )
    miss: Literal["copy", "cpu"] = Field(
        "copy",
        description="An expert missing from HBM: copy (its weights over PCIe into the cache) or "
        "cpu (run it on the host CPUs, as Fiddler does: only its tokens cross PCIe; the cache "
        "then changes only by prefetch).",
    )

    @property
    def enabled(self) -> bool:
        """Experts are offloaded (anything but ``type: none``)."""
        return self.type != "none"

    @model_validator(mode="after")
    def _size(self) -> Offload:
        if self.type == "cache" and (self.cache_experts is None) == (self.cache_gib is None):
            raise ValueError("type cache needs one of cache_experts or cache_gib")
        return self


class Gating(_Section):
    """Re-gating from router scores (trace logits, or the generator's scores)."""

    type: str = Field(
        "source",
        description="source (the routing as drawn or recorded), top_k, top_1, group_limited, "
        "expert_choice, base, s_base, sentence.",
    )


class Optimizer(_Section):
    """Data-parallel gradient synchronisation and the optimizer step (training; see
    :mod:`moesim.timing.gradsync`)."""

    zero: Literal[0, 1, 2, 3] = Field(
        1,
        description="0: plain data parallelism (all-reduce, full optimizer state on every "
        "GPU); 1: Megatron's distributed optimizer (ZeRO-1: reduce-scatter, optimizer state "
        "sharded over the data-parallel group, updated weights all-gathered); 2: ZeRO-2 "
        "(gradients sharded too); 3: ZeRO-3 / FSDP (parameters sharded too, each layer's "
        "all-gathered before it runs, forward and backward, prefetched in order).",
    )
    overlap_grad_reduce: bool = Field(
        True,
        description="Reduce each bucket as soon as the backward pass has produced it, "
        "overlapped with the rest of the backward pass (Megatron --overlap-grad-reduce).",
    )
    grad_reduce_dtype: Literal["bf16", "fp32"] = Field(
        "bf16",
        description="Dtype gradients are reduced in (Megatron's grad_reduce_in_fp32 is off by "
        "default: the parameters' bf16).",
    )
    bucket_params: int | None = Field(
        None,
        ge=1,
        le=2**40,
        description="Parameters per GPU in a gradient bucket (default: Megatron-Core's, "
        "max(40M, 1M x the data-parallel group's size)).",
    )


class Pipeline(_Section):
    """The pipeline schedule of a training step (``parallelism.pp`` > 1 or several
    micro-batches; see :mod:`moesim.timing.pipeline`)."""

    schedule: Literal["1f1b", "interleaved", "dualpipe"] = Field(
        "1f1b",
        description="1f1b: one forward, one backward (PipeDream-flush, Megatron's default); "
        "interleaved: 1F1B over vpp virtual stages per GPU (Megatron); dualpipe: DeepSeek's "
        "bidirectional schedule (each stage holds two chunks, one micro-batch's forward "
        "overlapped with another's backward).",
    )


class Policies(_Section):
    """Swappable strategies."""

    gating: Gating = Gating()
    capacity: Capacity = Capacity()
    placement: Placement = Placement()
    all_to_all: AllToAll = AllToAll()
    offload: Offload = Offload()
    overlap: Overlap = Overlap()
    optimizer: Optimizer = Optimizer()
    pipeline: Pipeline = Pipeline()


class Engine(_Section):
    """Accuracy/speed settings of the timing stage."""

    isolated_transfers: Literal["sharing", "fluid"] = Field(
        "sharing",
        description="How a transfer whose links are its own is scheduled. sharing: each link "
        "shared equally by its flows (processor sharing), a flow done when through every link "
        "of its path (within 0.01% of the exact max-min fluid model on phase time and 0.5% on "
        "any GPU's finish, 8 to 256 GPUs; moesim.timing.sharing); fluid: the max-min fluid "
        "model with flow_tolerance, as shared links are.",
    )
    flow_tolerance: float = Field(
        0.1,
        ge=0,
        le=0.5,
        description="Flows finishing within this fraction of a transfer's lower-bound time of "
        "the earliest one retire in the same rate update (0: exact max-min fluid model; 0.1 "
        "was measured within 1.8% of exact on phase time and 3.4% on any GPU's finish on "
        "8- to 64-GPU all-to-alls, 7% and 16% at 256 GPUs; see moesim.timing.network). "
        "Transfers on shared links, and isolated ones with isolated_transfers fluid.",
    )
    lockstep: bool = Field(
        True,
        description="Run inference steps that are a fixed sequence per GPU (no two-batch "
        "overlap, tensor or pipeline parallelism, offload, migration; every link one GPU's) "
        "on arrays instead of SimPy events: the same results within float rounding, several "
        "times faster (moesim.timing.lockstep). false: always the SimPy walk.",
    )
    micro_batch_samples: int = Field(
        2,
        ge=1,
        le=64,
        description="Pipelined training: micro-batches whose routing is drawn and whose "
        "chunks are timed through the full model each step; micro-batch m reuses sample "
        "m % samples (all micro-batches come from the same routing distribution).",
    )


class Output(_Section):
    """What a run writes."""

    dir: str = Field(
        "results",
        min_length=1,
        max_length=4096,
        description="Results root; runs go to <dir>/<scenario>/<run-id>/ (~ is your home).",
    )
    timeline_steps: int = Field(2, ge=0, le=1000, description="Steps recorded in timeline.json.")
    report: bool = Field(True, description="Write report.html.")


class Scenario(_Section):
    """One simulation scenario. See the README's scenario reference."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$",
        max_length=100,
        description="Scenario name (used in result paths): letters, digits, _ . -, not "
        "starting with a dot.",
    )
    description: str = Field("", max_length=10_000, description="Free text.")
    model: str = Field(
        max_length=4096,
        description="Preset name, or a path to an HF config.json or model YAML.",
    )
    hardware: str = Field(max_length=4096, description="Hardware profile name or path.")
    cluster: Cluster = Cluster()
    parallelism: Parallelism = Parallelism()
    workload: Workload
    routing: Routing = Routing()
    policies: Policies = Policies()
    engine: Engine = Engine()
    serving: Serving | None = Field(
        None, description="Requests to serve and how (workload.mode serve)."
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of every random choice.")
    output: Output = Output()

    @model_validator(mode="after")
    def _serving(self) -> Scenario:
        if (self.workload.mode == "serve") != (self.serving is not None):
            raise ValueError("workload.mode serve and a serving section go together")
        return self
