"""Pipelined training steps: the schedule of :mod:`moesim.timing.pipeline` timed with the
SimPy model of one stage.

All pipeline stages have the same GPUs (``dp * ep * tp`` of them, laid out alike) and differ
only in the layers they hold, so one :class:`~moesim.timing.engine.Engine` over one stage's
GPUs times every op: a forward or backward chunk of a micro-batch walks that chunk's layers on
all the stage's GPUs (attention, all-to-alls among the stage's EP groups, experts, TP
all-reduces), DualPipe's overlapped pair walks a forward and a backward chunk at once on the
same compute stream and network. An op lasts from its start to the last GPU's end (its EP
all-to-alls keep the stage's GPUs together). The schedule is then timed exactly on these
durations (:func:`moesim.timing.pipeline.run_schedule`), and each stage, after its last op,
reduces its gradients over its data-parallel groups, steps the optimizer over its shard and
gathers the weights (:meth:`Engine.time_gradients`).

What this leaves out, and why it is small:

- **Sampled micro-batches.** Each step draws the routing of ``engine.micro_batch_samples``
  micro-batches and times every chunk for each; micro-batch ``m`` takes sample ``m % K``'s
  times. Micro-batches are draws of one routing distribution, so their chunk times differ
  only by routing noise (the imbalance of the busiest EP rank).
- **Traffic between stages.** Point-to-point sends of activations and their gradients
  (``tokens x hidden`` bf16 per GPU, split over ``tp`` as Megatron-Core's scatter-gather does)
  take latency plus bytes over the link between the two stages' GPUs (NVLink inside a node,
  the GPU's NIC between nodes); they do not share links with the stages' own all-to-alls.
  Stages on different nodes share no links on a non-blocking network.
- **Gradient reduction** starts after a stage's last op (Megatron-Core can start it during the
  last micro-batch's backward pass); stages that finish early hide it behind the others.
- **Zero-bubble weight gradients** (DualPipe's ``W``): half of the chunk's backward compute
  (a matmul's backward is two matmuls of its forward's FLOPs, one for the input gradient and
  one for the weights'); its input-gradient part ``Bi`` is the rest of the backward pass.
- Expert re-placement (EPLB migration) is not simulated in pipelined steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from moesim.config.loading import ResolvedScenario
from moesim.metrics.collector import Collector
from moesim.routing.stage import RoutingStage
from moesim.timing import gradsync
from moesim.timing.costs import OpCostModel
from moesim.timing.engine import Engine, ProgressFn, _slowed
from moesim.timing.pipeline import (
    Op,
    Timed,
    idle_seconds,
    run_schedule,
    schedule_of,
    stage_layers,
    stage_scenario,
)
from moesim.timing.plan import Layout, StepPlan, gpu_slot_tokens, make_plan

WEIGHT_GRADIENT_SHARE = 0.5
"""Share of a chunk's backward compute that computes weight gradients (see the module
docstring)."""


@dataclass
class _Cost:
    """What one op (or a stage's gradient work) put on the stage's GPUs: seconds, and the
    collector's arrays it added to."""

    seconds: float
    layers: np.ndarray
    phase: np.ndarray  # [layers, W, phases]
    busy: np.ndarray  # [W]
    wait: np.ndarray  # [W]
    slowed: np.ndarray  # [W]
    bytes_out: np.ndarray  # [layers, W]
    bytes: np.ndarray  # intra, inter, dp intra, dp inter

    def scaled(self, share: float) -> _Cost:
        return _Cost(
            self.seconds * share,
            self.layers,
            self.phase * share,
            self.busy * share,
            self.wait * share,
            self.slowed * share,
            self.bytes_out * share,
            self.bytes * share,
        )


class PipelineEngine:
    """Runs a pipelined training scenario's steps.

    Args:
        r: The resolved scenario.
        routing: The routing stage (for the stage's GPUs: ``dp`` replicas of ``ep`` ranks).
        costs: The compute-cost model.
        collector: Where results are recorded, over all ``pp * dp * ep * tp`` GPUs.
    """

    def __init__(
        self, r: ResolvedScenario, routing: RoutingStage, costs: OpCostModel, collector: Collector
    ) -> None:
        self.r, self.routing, self.costs, self.col = r, routing, costs, collector
        self.stage_r = stage_scenario(r)
        self.sched, self.chunks = schedule_of(r)
        self.pp = self.sched.pp
        self.width = self.stage_r.world
        m = r.model
        self.scratch = Collector(1, m.num_layers, self.width, m.moe_layers, r.gpus_per_node, 0)
        self.engine = Engine(self.stage_r, routing, costs, self.scratch)
        self.layout = Layout.of(self.stage_r)
        self.samples = min(r.scenario.engine.micro_batch_samples, r.scenario.workload.micro_batches)
        self.held = stage_layers(self.sched, self.chunks)
        self.ops_s: dict[str, float] = {}
        self.timed: list[list[list[Timed]]] = []  # per step, per stage
        self.p2p_s = 0.0
        self._tails: dict[int, _Cost] = {}
        self._p2p: dict[tuple[int, int], float] = {}

    @property
    def env(self) -> Any:
        """The stage engine's SimPy environment."""
        return self.engine.env

    @property
    def topology(self) -> Any:
        """The stage's topology (link records are the stage engine's)."""
        return self.engine.topology

    @property
    def net(self) -> Any:
        """The stage's network."""
        return self.engine.net

    @property
    def offload(self) -> None:
        """Pipelined training has no expert offload."""
        return None

    def run(self, progress: ProgressFn | None = None) -> None:
        """Simulate every step; ``progress(done, total)`` is called after each."""
        steps = self.r.scenario.workload.steps
        for step in range(steps):
            self._step(step)
            if progress:
                progress(step + 1, steps)

    def _step(self, step: int) -> None:
        k = self.samples
        routings = [self.routing.step(step * k + i) for i in range(k)]
        plans = [make_plan(self.stage_r, self.layout, self.costs, rt, step) for rt in routings]
        m = self.sched.micro_batches
        for p in plans:
            for op, sec in p.ops.items():  # ops of the whole model per micro-batch
                self.ops_s[op] = self.ops_s.get(op, 0.0) + sec * m / k / self.pp
        memo: dict[Any, _Cost] = {}
        tokens = plans[0].tokens_per_rank

        def cost(op: Op) -> _Cost:
            key = tuple((p.kind, self.sched.chunk(p), p.mb % k) for p in op)
            if key not in memo:
                memo[key] = self._op_cost(step, key, plans)
            return memo[key]

        timed = run_schedule(
            self.sched, lambda op, _s: cost(op).seconds, lambda a, b: self._hop(a, b, tokens)
        )
        ends = []
        for s, ops in enumerate(timed):
            tail = self._tail(step, s)
            ends.append(ops[-1].end + tail.seconds)
            self._add(step, s, tail)
            for t in ops:
                self._add(step, s, cost(t.op))
        self.timed.append(timed)
        # busy, waits and contention were added op by op
        self.col.step_time_s[step] = max(ends)
        self.col.tokens_per_step[step] = (
            tokens * self.layout.ep * self.r.scenario.parallelism.dp * m
        )
        self._record_routing(step, routings[0])
        self._record_timeline(step, timed)

    def _op_cost(
        self, step: int, key: tuple[tuple[str, int, int], ...], plans: list[StepPlan]
    ) -> _Cost:
        """Simulate one op on the stage's GPUs (a ``Bi`` or ``W`` part is its share of the
        chunk's full backward pass)."""
        kinds = [kind for kind, _, _ in key]
        if len(key) == 1 and kinds[0] in ("Bi", "W"):
            _, chunk, sample = key[0]
            full = self._op_cost(step, (("B", chunk, sample),), plans)
            w = WEIGHT_GRADIENT_SHARE * float(full.busy.mean())
            w = min(w, full.seconds)
            if kinds[0] == "W":  # its spans stay with Bi's record; only its time counts here
                return dataclasses.replace(full.scaled(0.0), seconds=w)
            return dataclasses.replace(full, seconds=full.seconds - w)
        walks = [(plans[sample], self.chunks[chunk], kind != "F") for kind, chunk, sample in key]
        layers = sorted({x for _, c, _ in key for x in self.chunks[c]})
        return self._measure(layers, lambda: self.engine.time_walks(0, walks))

    def _tail(self, step: int, stage: int) -> _Cost:
        """A stage's gradient reductions, optimizer step and weight gathers (the same every
        step: measured once)."""
        if stage not in self._tails:
            held = self.held[stage]
            buckets = gradsync.buckets(self.stage_r, held)
            opt = gradsync.optimizer_seconds(self.stage_r, held)
            layers = list(range(self.r.model.num_layers))
            self._tails[stage] = self._measure(
                layers, lambda: self.engine.time_gradients(0, buckets, opt)
            )
        return self._tails[stage]

    def _measure(self, layers: list[int], run: Callable[[], float]) -> _Cost:
        """Run ``run`` on the stage engine and return what it added to the scratch collector."""
        col, gpus = self.scratch, self.engine.gpus
        idx = np.asarray(layers, dtype=np.int64)
        before = (
            col.phase_s[0, idx].copy(),
            np.array([g.compute.busy_s for g in gpus]),
            col.wait_s[0].copy(),
            np.array([_slowed(g) for g in gpus]),
            col.bytes_out[0, idx].copy(),
            _bytes(col),
        )
        seconds = run()
        after = (
            col.phase_s[0, idx],
            np.array([g.compute.busy_s for g in gpus]),
            col.wait_s[0],
            np.array([_slowed(g) for g in gpus]),
            col.bytes_out[0, idx],
            _bytes(col),
        )
        d = [a - b for a, b in zip(after, before, strict=True)]
        return _Cost(seconds, idx, d[0], d[1], d[2], d[3], d[4], d[5])

    def _add(self, step: int, stage: int, c: _Cost) -> None:
        """Put an op's record on the GPUs of ``stage``."""
        col = self.col
        gpus = stage * self.width + np.arange(self.width)
        col.phase_s[step][np.ix_(c.layers, gpus)] += c.phase
        col.compute_busy_s[step, gpus] += c.busy
        col.wait_s[step, gpus] += c.wait
        col.sm_contention_s[step, gpus] += c.slowed
        col.bytes_out[step][np.ix_(c.layers, gpus)] += c.bytes_out
        col.bytes_intra[step] += c.bytes[0]
        col.bytes_inter[step] += c.bytes[1]
        col.dp_bytes[step] += c.bytes[2:]

    def _hop(self, src: int, dst: int, tokens: int) -> float:
        """Seconds to send one micro-batch's activations from stage ``src`` to ``dst``."""
        key = (src, dst)
        if key not in self._p2p:
            r = self.r
            node = r.hardware.node
            nbytes = tokens * r.model.hidden_size * 2.0 / r.scenario.parallelism.tp
            gpn = r.gpus_per_node
            if (src * self.width) // gpn == (dst * self.width) // gpn:
                bw = node.nvlink_gb_per_s * 1e9 * node.nvlink_efficiency
                lat = node.nvlink_latency_s
            else:
                bw = node.nic_gb_per_s * 1e9 * node.nic_efficiency
                lat = r.hardware.fabric.latency_s
            self._p2p[key] = lat + nbytes / bw
            self.p2p_s = max(self.p2p_s, self._p2p[key])
        return self._p2p[key]

    def _record_routing(self, step: int, routing: Any) -> None:
        """The first sampled micro-batch's routing, on every stage's GPUs alike."""
        lay, pp = self.layout, self.pp
        per_gpu = gpu_slot_tokens(lay, routing).sum(axis=-1)  # [L, W]
        self.col.on_routing(
            step,
            routing,
            np.tile(per_gpu, (1, pp)),
            (np.tile(lay.replica, pp), np.tile(lay.rank, pp), np.tile(lay.tp_rank, pp), lay.tp),
            self.r.model.moe.top_k,
            self.r.scenario.workload.seq_len,
        )

    def _record_timeline(self, step: int, timed: list[list[Timed]]) -> None:
        """Chrome-trace rows: one per stage, an event per op (its first GPU's row)."""
        col = self.col
        if step >= col.timeline_steps:
            return
        offset = float(self.col.step_time_s[:step].sum())
        for s, ops in enumerate(timed):
            for t in ops:
                name = "F&B" if len(t.op) > 1 else t.op[0].kind
                col.events.append(
                    {
                        "name": name,
                        "cat": "pipeline",
                        "ph": "X",
                        "ts": (offset + t.start) * 1e6,
                        "dur": (t.end - t.start) * 1e6,
                        "pid": (s * self.width) // self.r.gpus_per_node,
                        "tid": s * self.width,
                        "args": {
                            "step": step,
                            "stage": s,
                            "micro_batch": [p.mb for p in t.op],
                            "chunk": [self.sched.chunk(p) for p in t.op],
                        },
                    }
                )

    def summary(self) -> dict[str, Any]:
        """The ``pipeline`` block of the summary (times of the last step)."""
        timed = self.timed[-1]
        step = float(self.col.step_time_s[len(self.timed) - 1])
        idle = idle_seconds(timed, step)
        tails = [self._tails[s].seconds for s in range(self.pp)]
        idle = [i - t for i, t in zip(idle, tails, strict=True)]
        par = self.r.scenario.parallelism
        return {
            "schedule": self.sched.name,
            "pp": par.pp,
            "vpp": par.vpp,
            "micro_batches": self.sched.micro_batches,
            "micro_batch_samples": self.samples,
            "chunk_layers": [len(c) for c in self.chunks],
            "p2p_s": self.p2p_s,
            "bubble_s": float(np.mean(idle)),
            "bubble_fraction": float(np.mean(idle) / step) if step else 0.0,
            "stages": [
                {
                    "stage": s,
                    "layers": [int(x) for x in self.held[s]],
                    "busy_s": float(sum(t.end - t.start for t in timed[s])),
                    "bubble_s": float(idle[s]),
                    "gradients_s": float(tails[s]),
                }
                for s in range(self.pp)
            ],
        }


def _bytes(col: Collector) -> np.ndarray:
    return np.array([col.bytes_intra[0], col.bytes_inter[0], *col.dp_bytes[0]])
