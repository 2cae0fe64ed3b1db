"""The collector: the engine's hooks write here; summaries and tables are read from it.

Per (step, layer, GPU) it keeps the seconds spent in each phase, and per step the routing
counts and communication bytes. Chrome-trace events are kept for the first
``timeline_steps`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from moesim.comm.alltoall import moved_bytes
from moesim.jit import kernel

if TYPE_CHECKING:
    from moesim.routing.stage import StepRouting

PHASES = (
    "attention",
    "gate",
    "dispatch",
    "expert_compute",
    "shared_expert",
    "dense_ffn",
    "combine",
    "tp_comm",
    "migrate",
    "offload_wait",
    "dp_comm",
    "optimizer",
)
COMM_PHASES = ("dispatch", "combine", "tp_comm", "migrate", "dp_comm")
PHASE_INDEX = {p: i for i, p in enumerate(PHASES)}


class Collector:
    """Arrays of what happened, filled by ``on_*`` hooks.

    Args:
        steps: Steps simulated.
        layers: Model layers.
        gpus: GPUs.
        moe_layers: Indices of the MoE layers.
        gpus_per_node: For the timeline's process ids.
        timeline_steps: Steps recorded as Chrome-trace events.
    """

    def __init__(
        self,
        steps: int,
        layers: int,
        gpus: int,
        moe_layers: tuple[int, ...],
        gpus_per_node: int,
        timeline_steps: int,
    ) -> None:
        self.phase_s = np.zeros((steps, layers, gpus, len(PHASES)))
        self.wait_s = np.zeros((steps, gpus))
        self.step_time_s = np.zeros(steps)
        self.compute_busy_s = np.zeros((steps, gpus))
        self.sm_contention_s = np.zeros((steps, gpus))
        n_moe = len(moe_layers)
        self.moe_layers = moe_layers
        self.gpu_tokens = np.zeros((steps, n_moe, gpus), dtype=np.int64)
        self.routed = np.zeros((steps, n_moe), dtype=np.int64)
        self.dropped = np.zeros((steps, n_moe), dtype=np.int64)
        self.dropped_by_gpu = np.zeros((steps, n_moe, gpus), dtype=np.int64)
        self.imbalance = np.zeros((steps, n_moe))
        self.dropped_by_bin: np.ndarray | None = None  # [steps, bins], set on first record
        self.routed_by_bin: np.ndarray | None = None
        self.padding = np.zeros(steps, dtype=np.int64)
        self.migration_bytes = np.zeros(steps)
        self.aux_loss = np.full((steps, n_moe), np.nan)
        self.bytes_out = np.zeros((steps, layers, gpus))
        self.bytes_intra = np.zeros(steps)
        self.bytes_inter = np.zeros(steps)
        self.dp_bytes = np.zeros((steps, 2))  # data-parallel bytes: intra-node, inter-node
        self.events: list[Any] = []  # Chrome-trace events, or spans of several GPUs at once
        self.gpn = gpus_per_node
        self.timeline_steps = timeline_steps
        self.tokens_per_step = np.zeros(steps, dtype=np.int64)

    def on_phase(
        self, step: int, layer: int, gpu: int, phase: str, start: float, end: float, mb: int = 0
    ) -> None:
        """A GPU spent [start, end) seconds in ``phase`` of ``layer`` of micro-batch ``mb``.

        Timeline rows: one per GPU, and with two-batch overlap one more per GPU (``tid`` gpus +
        gpu) for the second micro-batch, so the overlapping spans do not share a row.
        """
        self.phase_s[step, layer, gpu, PHASE_INDEX[phase]] += end - start
        if step < self.timeline_steps and end > start:
            self.on_timeline(step, layer, gpu, phase, start, end, mb)

    def on_phases(
        self,
        step: int,
        layer: int,
        gpus: np.ndarray | None,
        phase: str,
        start: np.ndarray,
        end: np.ndarray,
    ) -> None:
        """:meth:`on_phase` for several GPUs at once (``gpus`` None: every GPU; ``start``,
        ``end``: one per GPU)."""
        where = slice(None) if gpus is None else gpus
        self.phase_s[step, layer, where, PHASE_INDEX[phase]] += end - start
        if step < self.timeline_steps:  # as events when the timeline is read (:meth:`timeline`)
            ids = np.arange(self.phase_s.shape[2]) if gpus is None else np.asarray(gpus)
            start, end = np.broadcast_to(start, ids.shape), np.broadcast_to(end, ids.shape)
            self.events.append(_Spans(step, layer, phase, ids.copy(), start.copy(), end.copy()))

    def on_timeline(
        self, step: int, layer: int, gpu: int, phase: str, start: float, end: float, mb: int
    ) -> None:
        """One span of the timeline (see :meth:`on_phase`)."""
        self.events.append(self._event(step, layer, gpu, phase, start, end, mb))

    def _event(
        self, step: int, layer: int, gpu: int, phase: str, start: float, end: float, mb: int
    ) -> dict[str, Any]:
        args = {"step": step, "layer": layer} | ({"micro_batch": mb} if mb else {})
        return {
            "name": phase,
            "cat": "comm" if phase in COMM_PHASES else "compute",
            "ph": "X",
            "ts": start * 1e6,
            "dur": (end - start) * 1e6,
            "pid": gpu // self.gpn,
            "tid": gpu + mb * self.phase_s.shape[2],
            "args": args,
        }

    def timeline(self) -> list[dict[str, Any]]:
        """The recorded timeline as Chrome-trace events, in the order recorded."""
        out: list[dict[str, Any]] = []
        for e in self.events:
            if not isinstance(e, _Spans):
                out.append(e)
                continue
            for g, a, b in zip(e.gpus.tolist(), e.start.tolist(), e.end.tolist(), strict=True):
                if b > a:
                    out.append(self._event(e.step, e.layer, g, e.phase, a, b, 0))
        return out

    def on_routing(
        self,
        step: int,
        routing: StepRouting,
        gpu_tokens: np.ndarray,
        layout: tuple[np.ndarray, np.ndarray, np.ndarray, int],
        top_k: int,
        seq_len: int,
    ) -> None:
        """Step ``step``'s routing: tokens per GPU, routed, dropped (per GPU and by position),
        aux loss, padding, migration and imbalance.

        Args:
            routing: The step's routing.
            gpu_tokens: ``[moe_layers, gpus]`` tokens each GPU computes.
            layout: ``([gpus] replica, [gpus] EP rank, [gpus] TP rank, tp)``.
            top_k: Experts per token.
            seq_len: Tokens per sequence (position bins).
        """
        replica, rank, tp_rank, tp = layout
        reps = routing.replicas
        self.gpu_tokens[step] = gpu_tokens
        for c in reps:
            self.routed[step] += c.routed.sum(axis=1)
            self.dropped[step] += c.dropped.sum(axis=1)
        dropped = np.stack([c.dropped for c in reps])  # [dp, L, ep]
        self.dropped_by_gpu[step] = np.where(tp_rank[:, None] == 0, dropped[replica, :, rank], 0).T
        if routing.aux_loss is not None:
            self.aux_loss[step] = routing.aux_loss
        self.padding[step] = sum(int(c.padding.sum()) for c in reps)
        if routing.migration is not None:
            self.migration_bytes[step] = float(routing.migration.sum()) * tp * len(reps)
        if routing.bins > 1:
            bins = routing.bins
            pos_bin = np.minimum(routing.batch.position * bins // seq_len, bins - 1)
            per_bin = np.bincount(pos_bin.ravel(), minlength=bins) * top_k
            routed = per_bin * len(self.moe_layers) * len(reps)
            by_bin = sum(c.dropped_by_bin.sum(axis=0) for c in reps)
            self.on_drops_by_position(step, np.asarray(by_bin, dtype=np.int64), routed)
        loads = np.stack([c.slot_tokens.sum(axis=-1) for c in reps])
        mean = loads.mean(axis=-1)
        self.imbalance[step] = np.where(
            mean > 0, loads.max(axis=-1) / np.maximum(mean, 1e-30), 1.0
        ).mean(axis=0)

    def on_drops_by_position(self, step: int, dropped: np.ndarray, routed: np.ndarray) -> None:
        """``[bins]`` dropped and routed assignments by position bin of one step."""
        if self.dropped_by_bin is None:
            steps = self.step_time_s.shape[0]
            self.dropped_by_bin = np.zeros((steps, dropped.size), dtype=np.int64)
            self.routed_by_bin = np.zeros((steps, dropped.size), dtype=np.int64)
        assert self.routed_by_bin is not None
        self.dropped_by_bin[step] = dropped
        self.routed_by_bin[step] = routed

    def on_wait(self, step: int, gpu: int, seconds: float) -> None:
        """A GPU waited ``seconds`` at a collective for its slowest peer."""
        self.wait_s[step, gpu] += seconds

    def on_waits(self, step: int, gpus: np.ndarray, seconds: np.ndarray) -> None:
        """:meth:`on_wait` for several GPUs at once."""
        self.wait_s[step, gpus] += seconds

    def on_flows(
        self,
        step: int,
        layer: int,
        src: np.ndarray,
        dst: np.ndarray,
        nbytes: np.ndarray,
        gpn: int,
        data_parallel: bool = False,
    ) -> None:
        """Bytes put on the network by one phase (a GPU's copies to itself are not);
        ``data_parallel``: a gradient reduction or weight gather, also counted apart."""
        gpus = self.bytes_out.shape[2]
        totals = kernel("moesim.metrics._flows_jit", "flow_totals")
        if src.size >= COMPILED_MIN_FLOWS and totals is not None:
            sent, inter, within = totals(src, dst, nbytes.astype(np.float64), gpn, gpus)
        else:
            sent, inter, within = moved_bytes(src, dst, nbytes, gpn, gpus)
        self.on_moved(step, layer, sent, inter, within, data_parallel)

    def on_moved(
        self,
        step: int,
        layer: int,
        sent: np.ndarray,
        inter: float,
        within: float,
        data_parallel: bool = False,
    ) -> None:
        """:meth:`on_flows` from the phase's counts (:func:`moesim.comm.alltoall.moved_bytes`:
        bytes each GPU sent, bytes between and within nodes)."""
        self.bytes_inter[step] += inter
        self.bytes_intra[step] += within
        if data_parallel:
            self.dp_bytes[step] += (within, inter)
        self.bytes_out[step, layer] += sent

    def on_step(
        self,
        step: int,
        seconds: float,
        compute_busy: np.ndarray,
        tokens: int,
        sm_contention: np.ndarray | None = None,
    ) -> None:
        """Step ``step`` took ``seconds``; ``compute_busy`` is ``[gpus]`` seconds of compute,
        ``sm_contention`` the part of it added by communication kernels holding SMs."""
        self.step_time_s[step] = seconds
        self.compute_busy_s[step] = compute_busy
        if sm_contention is not None:
            self.sm_contention_s[step] = sm_contention
        self.tokens_per_step[step] = tokens


COMPILED_MIN_FLOWS = 4096
"""Phases of this many flows have their bytes counted by a compiled pass (numba, loaded by
then for the network)."""


@dataclass(frozen=True)
class _Spans:
    """Spans of one phase on several GPUs (:meth:`Collector.on_phases`), kept as arrays until
    the timeline is read."""

    step: int
    layer: int
    phase: str
    gpus: np.ndarray
    start: np.ndarray
    end: np.ndarray
