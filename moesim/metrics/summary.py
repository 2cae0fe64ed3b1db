"""The run summary (``summary.json``) and the per-layer table (``layers.parquet``).

``summary.json`` fields (times are seconds per step, averaged over steps and GPUs):

- ``step_time_s``: mean wall time of a step; ``tokens_per_s``: tokens processed per second
  (all replicas; decode counts one token per sequence per step);
- ``breakdown_s``: seconds per step in attention, gate, dispatch, expert_compute,
  shared_expert, dense_ffn, combine, tp_comm; ``exposed_comm`` is the step time the compute
  stream is idle (communication not hidden, including waiting for peers); ``straggler_wait``
  is the part spent waiting at collectives for the slowest GPU; ``sm_contention`` is the
  compute time added by communication kernels holding ``gpu.comm_sms`` SMs while compute
  overlaps them (two-batch or shared-expert overlap; included in the compute phases);
- ``imbalance_max_over_mean``: tokens computed by the busiest EP rank over the mean, averaged
  over steps and MoE layers (``imbalance_worst`` is the largest);
- ``drop_rate``: dropped / routed token-expert assignments; ``drop_rate_by_layer`` per MoE
  layer; ``drop_rate_by_position`` (prefill and training): ``position_start`` of each of up
  to 32 equal position bins and the drop rate of its tokens (drops towards the end of
  sequences show as a rising curve);
- ``aux_loss``: Switch load-balancing loss of the re-gating (``policies.gating``), mean over
  steps and MoE layers (1.0 is balanced; None without re-gating);
- ``padding_tokens``: padding rows computed per step (``pad: true``);
- ``migration_bytes``: expert bytes moved by re-placement over the run;
- ``bytes_intra_node`` / ``bytes_inter_node``: bytes per step on intra-node links and on NICs;
- ``data_parallel`` (training): GPUs per gradient group (``dense``: ep x dp, ``expert``: dp),
  gradient buckets, and the bytes per step of gradient reductions and weight gathers (part of
  the two above; :mod:`moesim.timing.gradsync`); ``dp_comm`` and ``optimizer`` in the
  breakdown are their seconds and the Adam step's;
- ``training`` (training): ``tokens_per_s_per_gpu``, ``model_flops_per_token`` (as Megatron
  counts: 6 per active matmul parameter plus the attention scores, no recompute),
  ``model_tflops_per_gpu`` and ``mfu`` (over the GPU's dense peak in the workload dtype);
- ``pipeline`` (pipelined training: ``pp`` > 1 or ``micro_batches`` > 1): the schedule, chunk
  layers, the point-to-point time between stages, the bubble (seconds and fraction of the
  step a stage runs nothing, gradient work apart), and per stage its layers, busy seconds,
  bubble, gradient seconds (reductions, optimizer, gathers) and HBM
  (:mod:`moesim.timing.stages`);
- ``hbm_peak_bytes``: HBM one GPU needs, with ``hbm_breakdown_bytes``;
- ``policies``: the scenario's policy settings (for comparisons);
- ``offload`` (expert offload only): ``hit_rate`` of the HBM expert caches, demand and
  prefetch copies per step, ``prefetch_useful`` (fraction of prefetches used),
  ``pcie_bytes_per_step`` (weights copied, or tokens sent to the host with ``miss: cpu``),
  ``cpu_experts_per_step`` and ``cpu_s_per_step`` (missed experts run on the host CPUs),
  ``stall_s`` (seconds per step a GPU waits for expert copies or host experts,
  ``offload_wait`` in the breakdown) and ``per_token_latency_s`` (decode: the step time).

``layers.parquet`` has one row per (step, layer, gpu) with the seconds of every phase and, for
MoE layers, ``tokens_computed``, ``tokens_dropped`` (at this GPU as a source rank) and
``bytes_sent``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from moesim.config.loading import ResolvedScenario
from moesim.metrics.collector import COMM_PHASES, PHASES, Collector
from moesim.timing.memory import HBMUsage


def summarize(
    r: ResolvedScenario, col: Collector, hbm: HBMUsage, cost_source: str
) -> dict[str, Any]:
    """Build the summary dict (JSON-ready, deterministic for a given scenario and seed)."""
    s = r.scenario
    per_phase = col.phase_s.sum(axis=1).mean(axis=(0, 1))  # [phases]
    breakdown = {p: float(v) for p, v in zip(PHASES, per_phase, strict=True)}
    waits = col.phase_s[..., PHASES.index("offload_wait")].sum(axis=1)  # [steps, gpus]
    exposed = (col.step_time_s[:, None] - col.compute_busy_s - waits).mean()
    breakdown["exposed_comm"] = float(max(exposed, 0.0))
    breakdown["straggler_wait"] = float(col.wait_s.mean())
    breakdown["sm_contention"] = float(col.sm_contention_s.mean())
    total_time = float(col.step_time_s.sum())
    tokens_per_s = float(col.tokens_per_step.sum() / total_time) if total_time else 0.0
    routed = int(col.routed.sum())
    out = {
        "scenario": s.name,
        "model": r.model.name,
        "hardware": r.hardware.name,
        "gpus": r.world,
        "nodes": s.cluster.nodes,
        "mode": s.workload.mode,
        "steps": s.workload.steps,
        "seed": s.seed,
        "step_time_s": float(col.step_time_s.mean()),
        "step_time_max_s": float(col.step_time_s.max()),
        "tokens_per_step": int(col.tokens_per_step[0]),
        "tokens_per_s": tokens_per_s,
        "breakdown_s": breakdown,
        "comm_phases": list(COMM_PHASES),
        "imbalance_max_over_mean": float(col.imbalance.mean()),
        "imbalance_worst": float(col.imbalance.max()),
        "drop_rate": float(col.dropped.sum() / routed) if routed else 0.0,
        "drop_rate_by_layer": _rates(col.dropped.sum(axis=0), col.routed.sum(axis=0)),
        "drop_rate_by_position": _by_position(col, s.workload.seq_len),
        "aux_loss": None if np.isnan(col.aux_loss).all() else float(np.nanmean(col.aux_loss)),
        "padding_tokens": int(col.padding.sum() / len(col.step_time_s)),
        "migration_bytes": float(col.migration_bytes.sum()),
        "tokens_routed": routed,
        "tokens_dropped": int(col.dropped.sum()),
        "bytes_intra_node": float(col.bytes_intra.mean()),
        "bytes_inter_node": float(col.bytes_inter.mean()),
        "hbm_peak_bytes": float(hbm.total),
        "hbm_capacity_bytes": float(r.hardware.gpu.hbm_bytes),
        "hbm_breakdown_bytes": hbm.as_dict(),
        "cost_model": cost_source,
        "policies": s.policies.model_dump(mode="json"),
    }
    if s.workload.mode == "train":
        from moesim.timing.gradsync import buckets, group_sizes

        out["data_parallel"] = {
            "group_gpus": group_sizes(r),
            "buckets": len(buckets(r)),
            "bytes_intra_node": float(col.dp_bytes[:, 0].mean()),
            "bytes_inter_node": float(col.dp_bytes[:, 1].mean()),
        }
        out["training"] = training_rates(r, tokens_per_s)
    return out


def model_flops_per_token(r: ResolvedScenario) -> float:
    """Training FLOPs per token as Megatron counts model FLOPs (no recompute): 6 per
    parameter a token uses in a matmul (its top-k routed and shared experts, attention, dense
    layers, the output layer; not the embedding lookup), plus forward and backward (3x) of
    the attention scores over the mean causal context ``seq_len / 2``."""
    m, w = r.model, r.scenario.workload
    matmul = m.active_params() - m.embedding_params + m.vocab_size * m.hidden_size
    scores = m.num_layers * m.attention.score_flops_per_token(w.seq_len / 2)
    return 6.0 * matmul + 3.0 * scores


def training_rates(r: ResolvedScenario, tokens_per_s: float) -> dict[str, float]:
    """The ``training`` block: tokens/s per GPU, model TFLOP/s per GPU and MFU (over the
    GPU's dense peak in the workload dtype)."""
    per_gpu = tokens_per_s / r.world
    flops = model_flops_per_token(r)
    peak = r.hardware.gpu.peak_dense_tflops[r.scenario.workload.dtype]
    tflops = per_gpu * flops / 1e12
    return {
        "tokens_per_s_per_gpu": per_gpu,
        "model_flops_per_token": flops,
        "model_tflops_per_gpu": tflops,
        "mfu": tflops / peak,
    }


def offload_summary(r: ResolvedScenario, col: Collector, stats: dict[str, Any]) -> dict[str, Any]:
    """The ``offload`` section: cache settings and counts, stall and per-token latency."""
    off = r.scenario.policies.offload
    waits = col.phase_s[..., PHASES.index("offload_wait")].sum(axis=1)  # [steps, gpus]
    out: dict[str, Any] = {"policy": off.policy, "prefetch": off.prefetch, **stats}
    out["stall_s"] = float(waits.mean())
    out["per_token_latency_s"] = (
        float(col.step_time_s.mean()) if r.scenario.workload.mode == "decode" else None
    )
    return out


def _rates(dropped: np.ndarray, routed: np.ndarray) -> list[float]:
    return [float(d / r) if r else 0.0 for d, r in zip(dropped, routed, strict=True)]


def _by_position(col: Collector, seq_len: int) -> dict[str, list[float]] | None:
    """Drop rate per position bin (prefill and training), bins as fractions of seq_len."""
    if col.dropped_by_bin is None or col.routed_by_bin is None:
        return None
    bins = col.dropped_by_bin.shape[1]
    return {
        "position_start": [float(b * seq_len / bins) for b in range(bins)],
        "rate": _rates(col.dropped_by_bin.sum(axis=0), col.routed_by_bin.sum(axis=0)),
    }


def layers_table(col: Collector) -> pd.DataFrame:
    """One row per (step, layer, gpu); see the module docstring for the columns."""
    steps, layers, gpus, _ = col.phase_s.shape
    idx = np.indices((steps, layers, gpus)).reshape(3, -1)
    data: dict[str, Any] = {
        "step": idx[0].astype(np.int32),
        "layer": idx[1].astype(np.int32),
        "gpu": idx[2].astype(np.int32),
    }
    flat = col.phase_s.reshape(-1, len(PHASES))
    for i, p in enumerate(PHASES):
        data[f"{p}_s"] = flat[:, i]
    computed = np.zeros((steps, layers, gpus), dtype=np.int64)
    dropped = np.zeros((steps, layers, gpus), dtype=np.int64)
    moe = list(col.moe_layers)
    computed[:, moe, :] = col.gpu_tokens
    dropped[:, moe, :] = col.dropped_by_gpu
    data["moe"] = np.isin(idx[1], moe)
    data["tokens_computed"] = computed.ravel()
    data["tokens_dropped"] = dropped.ravel()
    data["bytes_sent"] = col.bytes_out.ravel()
    return pd.DataFrame(data)
