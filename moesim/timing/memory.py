"""HBM accounting per GPU: weights, KV cache or activations, optimizer state, workspace.

Training keeps the weights, their gradients (``policies.optimizer.grad_reduce_dtype``) and
the fp32 master weights and two Adam moments (12 bytes per parameter; Rajbhandari et al.,
ZeRO, arXiv 1910.02054, section 3.1). ``policies.optimizer.zero`` 1 shards the 12 bytes over the
data-parallel group of each parameter (ep x dp GPUs for dense parameters, dp for an expert's:
:mod:`moesim.timing.gradsync`), 2 the gradients too, 3 the weights as well (plus the two layers
whose gathered parameters are in use or arriving). Activations per token per layer follow
Korthikanti et al. (arXiv 2205.05198, section 4.1) with flash attention (no ``s^2`` term):
``15 h`` bytes for attention and norms plus ``2h + 6f`` bytes for every routed or shared expert
a token visits (bf16; with ``workload.dtype: fp8`` an expert's input and fc1 output are cached
in FP8, ``h + 4f``, as DeepSeek-V3 does, arXiv 2412.19437 section 3.3.2).
``workload.recompute: selective`` (Megatron-Core's ``layernorm`` and
``moe_act`` recompute modules) keeps neither the norms' outputs (``4h``) nor the SwiGLU
outputs (``2f`` per expert); ``full`` keeps each layer's input (``2h``) and, during the
backward pass, one layer's activations.

With pipeline stages (:mod:`moesim.timing.pipeline`) every stage is accounted apart: the
weights, gradients and optimizer shard of the layers it holds (the embedding on the stage of
the first layer, the output layer on the last's; DualPipe's two chunks per stage hold twice
the parameters) and the activations of the micro-batches its schedule keeps in flight
(:func:`moesim.timing.pipeline.peak_in_flight`). The peak is the fullest stage's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moesim.config.loading import ResolvedScenario
from moesim.dtypes import ELEMENT_BYTES
from moesim.errors import CapacityError
from moesim.timing import pipeline
from moesim.timing.gradsync import KINDS, group_sizes, layer_params, shard_params

GiB = 1024**3


@dataclass(frozen=True)
class HBMUsage:
    """Bytes one GPU needs, by purpose."""

    weights: float
    kv_cache: float
    activations: float
    optimizer: float
    workspace: float

    @property
    def total(self) -> float:
        """All bytes."""
        return self.weights + self.kv_cache + self.activations + self.optimizer + self.workspace

    def as_dict(self) -> dict[str, float]:
        """Breakdown plus total, in bytes."""
        return {
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "activations": self.activations,
            "optimizer": self.optimizer,
            "workspace": self.workspace,
            "total": self.total,
        }


def hbm_usage(r: ResolvedScenario, slots_per_rank: int) -> HBMUsage:
    """Peak HBM bytes of one GPU of the scenario (all GPUs of a stage are alike in this
    respect; with pipeline stages, the fullest stage's)."""
    if pipeline.pipelined(r):
        return max(stage_usages(r), key=lambda u: u.total)
    return _usage(r, slots_per_rank)


def stage_usages(r: ResolvedScenario) -> list[HBMUsage]:
    """HBM bytes of one GPU of each pipeline stage of a training scenario."""
    s = r.scenario
    sched, chunks = pipeline.schedule_of(r)
    held = pipeline.stage_layers(sched, chunks)
    dense, expert = layer_params(r)
    per_layer = activation_bytes_per_layer(r)
    opt = s.policies.optimizer
    grad = ELEMENT_BYTES[opt.grad_reduce_dtype]
    out = []
    for stage, layers in enumerate(held):
        params = float(dense[layers].sum() + expert[layers].sum())
        shard = shard_params(r, layers)
        acts = pipeline.peak_in_flight(sched, stage, lambda c: per_layer * len(chunks[c]))
        acts += _recompute_extra(r)
        optim = 12 * shard + grad * (shard if opt.zero >= 2 else params)
        weights = _weight_bytes(r, params, shard, layers)
        out.append(HBMUsage(weights, 0.0, acts, optim, r.hardware.gpu.workspace_bytes))
    return out


def activation_bytes_per_layer(r: ResolvedScenario, recompute: str | None = None) -> float:
    """Activation bytes one GPU keeps per layer of a training micro-batch (see the module
    docstring), under ``recompute`` (default: the scenario's)."""
    s, m = r.scenario, r.model
    w, par = s.workload, s.parallelism
    h, f, k = m.hidden_size, m.moe.expert_intermediate_size, m.moe.top_k
    fs = m.moe.shared_intermediate_size
    recompute = recompute or w.recompute
    if recompute == "full":
        per_token = 2.0 * h
    else:
        selective = recompute == "selective"  # no norm outputs, no SwiGLU outputs
        fp8 = 1 if w.dtype == "fp8" else 2  # bytes of an expert's cached input and fc1 output

        def expert(width: int) -> float:
            return fp8 * h + 2 * fp8 * width + (0 if selective else 2 * width)

        per_token = (11 + (0 if selective else 4)) * h + k * expert(f)
        per_token += expert(fs) if fs else 0
    return (w.batch_size // par.ep) * w.seq_len * per_token / par.tp


def _weight_bytes(r: ResolvedScenario, params: float, shard: float, layers: Sequence[int]) -> float:
    """Weight bytes one GPU holds of ``params`` parameters: all of them, or with ZeRO-3 its
    ``shard`` plus the two layers whose gathered parameters are in use or arriving."""
    wbytes = ELEMENT_BYTES[r.scenario.workload.dtype]
    if r.scenario.policies.optimizer.zero != 3:
        return params * wbytes
    sizes = group_sizes(r)  # a kind whose group is one GPU is held whole, never gathered
    gathered = np.zeros(r.model.num_layers)
    for kind, per_layer in zip(KINDS, layer_params(r), strict=True):
        if sizes[kind] > 1:
            gathered += per_layer
    largest = max((float(gathered[x]) for x in layers), default=0.0)
    return (shard + 2 * largest) * wbytes


def _recompute_extra(r: ResolvedScenario) -> float:
    """Full recompute rebuilds one layer's activations at a time in the backward pass."""
    if r.scenario.workload.recompute != "full":
        return 0.0
    return activation_bytes_per_layer(r, "none")


def _usage(r: ResolvedScenario, slots_per_rank: int) -> HBMUsage:
    s, m, hw = r.scenario, r.model, r.hardware
    w, tp = s.workload, s.parallelism.tp
    n_moe = len(m.moe_layers)
    resident = n_moe * slots_per_rank
    if s.policies.offload.enabled:
        resident = min(cache_items(r), resident)
    params = (m.non_expert_params() + resident * m.expert_params) / tp
    weights = params * ELEMENT_BYTES[w.dtype]
    seqs = w.batch_size // s.parallelism.ep
    att = m.attention
    kv_split = tp if att.type == "gqa" and att.num_kv_heads >= tp else 1
    kv_len = w.context_len + w.steps if w.mode == "decode" else w.seq_len
    kv = 0.0
    if w.mode != "train":
        kv = seqs * kv_len * m.num_layers * att.kv_elements_per_token() * 2.0 / kv_split
    acts, optim = 0.0, 0.0
    if w.mode == "train":
        acts = m.num_layers * activation_bytes_per_layer(r) + _recompute_extra(r)
        shard = shard_params(r)  # (offload, which would hold fewer experts, is inference only)
        weights = _weight_bytes(r, params, shard, range(m.num_layers))
        grad = ELEMENT_BYTES[s.policies.optimizer.grad_reduce_dtype]
        optim = 12 * shard + grad * (shard if s.policies.optimizer.zero >= 2 else params)
    return HBMUsage(weights, kv, acts, optim, hw.gpu.workspace_bytes)


def expert_bytes(r: ResolvedScenario) -> float:
    """Bytes of one expert's weights on one GPU (its 1/tp slice)."""
    return r.model.expert_bytes(r.scenario.workload.dtype, r.scenario.parallelism.tp)


def cache_items(r: ResolvedScenario) -> int:
    """Experts the offload cache of one GPU holds (``cache_experts``, or ``cache_gib`` of
    expert slices)."""
    off = r.scenario.policies.offload
    if off.cache_experts is not None:
        return off.cache_experts
    assert off.cache_gib is not None
    return int(off.cache_gib * GiB // expert_bytes(r))


def check_fits(r: ResolvedScenario, usage: HBMUsage, slots_per_rank: int | None = None) -> None:
    """Raise :class:`CapacityError` with the breakdown when ``usage`` exceeds HBM (or, with
    offload, when a node's host memory cannot hold its GPUs' experts)."""
    cap = r.hardware.gpu.hbm_bytes
    if r.scenario.policies.offload.enabled and slots_per_rank is not None:
        host = len(r.model.moe_layers) * slots_per_rank * expert_bytes(r) * r.gpus_per_node
        if host > r.hardware.node.host_memory_bytes:
            raise CapacityError(
                f"{r.scenario.name}: offloaded experts need {host / GiB:.1f} GiB of host memory "
                f"per node but the profile has {r.hardware.node.host_memory_bytes / GiB:.1f} GiB"
            )
    if usage.total <= cap:
        return
    parts = ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in usage.as_dict().items() if k != "total")
    if pipeline.pipelined(r):
        stages = stage_usages(r)
        worst = max(range(len(stages)), key=lambda i: stages[i].total)
        raise CapacityError(
            f"{r.scenario.name}: pipeline stage {worst} of {len(stages)} needs "
            f"{usage.total / GiB:.1f} GiB of HBM per GPU but {r.hardware.gpu.model} has "
            f"{cap / GiB:.1f} GiB ({parts}). Add pipeline stages or EP ranks, shard more "
            "(policies.optimizer.zero), recompute (workload.recompute), or lower batch_size."
        )
    raise CapacityError(
        f"{r.scenario.name}: needs {usage.total / GiB:.1f} GiB of HBM per GPU but "
        f"{r.hardware.gpu.model} has {cap / GiB:.1f} GiB ({parts}). Raise ep/tp, lower "
        f"batch_size or context, or use a larger GPU."
    )
