"""Inference steps without SimPy: every GPU's walk over the layers advanced together on arrays.

A decode or prefill step without two-batch overlap, tensor parallelism, pipeline stages,
expert offload, expert migration or SM-sharing compute streams is a fixed sequence per GPU:
compute pieces on its in-order stream, then the EP group's all-to-all, which starts when the
group's last GPU arrives and, on a network where every link belongs to one GPU (NVSwitch
ports, rail NICs; :meth:`moesim.hardware.topology.Topology.private`), meets no other traffic:
an isolated transfer whose per-GPU finish times are known as soon as it starts. So the step
needs no event queue: the engine's clocks, one per GPU, move layer by layer as numpy arrays,
with the arithmetic of the SimPy walk (a stream's work starts at ``max(now, free_at)``, a
timer fires at ``now + (at - now)``), and the collector gets the same records. The summaries
agree with the SimPy walk's within float rounding (``tests/timing/test_lockstep.py`` runs
both). The timeline's spans are the same; they are listed layer by layer instead of in
simulated-time order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from moesim.timing.gpu import Stream
from moesim.timing.plan import gpu_slot_tokens, make_plan

if TYPE_CHECKING:
    from moesim.comm.alltoall import Flows
    from moesim.config.loading import ResolvedScenario
    from moesim.hardware.topology import Topology
    from moesim.metrics.collector import Collector
    from moesim.routing.stage import RoutingStage
    from moesim.timing.costs import OpCostModel
    from moesim.timing.gpu import GPU
    from moesim.timing.network import FlowNetwork
    from moesim.timing.plan import FlowBuilder, Layout, StepPlan

ProgressFn = Callable[[int, int], None]

COMPILED_MIN_PHASES = 4096
"""All-to-all phases from which a run computes them compiled on any network (numba loads in
about half a second; a phase of 8 GPUs then takes ~40 us instead of ~250 us on numpy)."""


class LockstepSteps:
    """The engine's steps on arrays (see the module docstring); a mixin of
    :class:`moesim.timing.engine.Engine`."""

    if TYPE_CHECKING:  # set by the engine
        r: ResolvedScenario
        spec: Any  # moesim.timing.engine.EngineSpec
        topology: Topology
        net: FlowNetwork
        layout: Layout
        routing: RoutingStage
        costs: OpCostModel
        col: Collector
        gpus: list[GPU]
        moe_index: dict[int, int]
        ops_s: dict[str, float]
        _plans: list[StepPlan]
        _migration: np.ndarray | None
        _walk_layers: set[int] | None

        flows: FlowBuilder

        def _flows_of(self, key: tuple[Any, ...]) -> Flows: ...

        def _record_routing(self, step: int, routing: Any, gpu_tokens: np.ndarray) -> None: ...

    def lockstep_applies(self) -> bool:
        """Whether the scenario's steps are the fixed sequence the lockstep walk runs."""
        s, spec, topo = self.r.scenario, self.spec, self.topology
        every_link_owned = bool(((topo.link_owner >= 0) | topo.implied).all())
        return (
            not spec.train
            and not spec.offload
            and s.policies.overlap.micro_batches == 1
            and s.parallelism.tp == 1
            and s.parallelism.pp == 1
            and not s.policies.placement.rebalance_every_steps
            and self._walk_layers is None
            and all(type(g.compute) is Stream for g in self.gpus)
            and every_link_owned
        )

    lockstep_events = 0
    """Per-GPU resumptions the lockstep walk computed (what the SimPy walk would process as
    events: a GPU resuming after its compute or a collective), for benchmarks."""

    def run_lockstep(self, progress: ProgressFn | None = None) -> None:
        """Simulate every step on arrays (:meth:`lockstep_applies` must hold)."""
        world = self.spec.world
        clock = _Clock(
            now=np.zeros(world),
            free=np.array([g.compute.free_at for g in self.gpus]),
            busy=np.array([g.compute.busy_s for g in self.gpus]),
        )
        leaders = sorted({int(g[0]) for g in self.layout.ep_groups})
        groups = [self.layout.ep_group(g) for g in leaders]
        phases = self.spec.steps * len(self.moe_index) * 2 * len(groups)
        if phases >= COMPILED_MIN_PHASES:  # worth loading numba for, whatever the cluster
            self.net.compiled = True
        start = 0.0
        for step in range(self.spec.steps):
            routing = self.routing.step(step)
            per_gpu = gpu_slot_tokens(self.layout, routing)
            self._record_routing(step, routing, per_gpu.sum(axis=-1))
            plan = make_plan(self.r, self.layout, self.costs, routing, step, None, per_gpu)
            for op, sec in plan.ops.items():
                self.ops_s[op] = self.ops_s.get(op, 0.0) + sec
            self._plans, self._migration = [plan], routing.migration
            busy0 = clock.busy.copy()
            clock.now[:] = start
            for layer in range(self.r.model.num_layers):
                self._lockstep_layer(clock, step, layer, plan, groups, leaders)
            end = float(clock.now.max())
            tokens = routing.batch.tokens_per_rank * self.layout.ep * self.spec.dp
            self.col.on_step(step, end - start, clock.busy - busy0, tokens, np.zeros(world))
            start = end
            if progress:
                progress(step + 1, self.spec.steps)
        for g, gpu in enumerate(self.gpus):  # the streams as the SimPy walk leaves them
            gpu.compute.free_at, gpu.compute.busy_s = float(clock.free[g]), float(clock.busy[g])

    def _lockstep_layer(
        self,
        clock: _Clock,
        step: int,
        layer: int,
        plan: StepPlan,
        groups: list[np.ndarray],
        leaders: list[int],
    ) -> None:
        moe = self.moe_index.get(layer)
        if moe is None:
            self._lockstep_compute(
                clock, step, layer, [("attention", plan.attention), ("dense_ffn", plan.dense)]
            )
            return
        self._lockstep_compute(
            clock, step, layer, [("attention", plan.attention), ("gate", plan.gate)]
        )
        experts: list[tuple[str, Any]] = [
            ("expert_compute", plan.experts[moe]),
            ("shared_expert", plan.shared),
        ]
        if self.spec.shared_overlap and plan.shared > 0:  # queued now, run during the dispatch
            self._lockstep_compute(clock, step, layer, [experts.pop()], wait=False)
        self._lockstep_all_to_all(clock, step, layer, "dispatch", groups, leaders)
        self._lockstep_compute(clock, step, layer, experts)
        self._lockstep_all_to_all(clock, step, layer, "combine", groups, leaders)

    def _lockstep_compute(
        self,
        clock: _Clock,
        step: int,
        layer: int,
        pieces: list[tuple[str, Any]],
        wait: bool = True,
    ) -> None:
        """Queue ``pieces`` (phase, seconds: a number or one per GPU) on every GPU's stream
        (:meth:`moesim.timing.gpu.Stream.run`'s arithmetic); ``wait``: the walk waits for
        their end."""
        total: Any = 0
        for _, d in pieces:
            total = total + d
        begin = np.maximum(clock.now, clock.free)
        clock.free = begin + total
        clock.busy = clock.busy + total
        t = begin
        for phase, d in pieces:
            self.col.on_phases(step, layer, None, phase, t, t + d)
            t = t + d
        if wait:
            clock.now = clock.now + (clock.free - clock.now)
            self.lockstep_events += clock.now.size

    def _lockstep_all_to_all(
        self,
        clock: _Clock,
        step: int,
        layer: int,
        phase: str,
        groups: list[np.ndarray],
        leaders: list[int],
    ) -> None:
        """Every EP group's ``phase``: it starts when its last GPU arrives (after the fixed
        launch seconds), each GPU resumes when its flows have arrived (the SimPy walk's
        :meth:`moesim.timing.network.FlowNetwork.transfer` and timers)."""
        arrive = clock.now.copy()
        fixed = self.spec.a2a_fixed_s
        for members, first in zip(groups, leaders, strict=True):
            started = float(arrive[members].max())
            at = started + fixed if fixed > 0 else started
            pf = self.flows.alltoall_pairs(self._plans[0], self.moe_index[layer], first, phase)
            if pf is not None:  # scheduled from the count matrix
                out = self.net.isolated_pairs(pf, members, at)
            else:
                out = self.net.isolated(self._flows_of((0, layer, phase, first)), members, at)
            self.col.on_moved(step, layer, out.sent, out.inter, out.within)
            done = out.done[members]
            resume = np.where(done > at, at + (done - at), at)
            self.col.on_waits(step, members, started - arrive[members])
            self.col.on_phases(step, layer, members, phase, arrive[members], resume)
            clock.now[members] = resume
            self.lockstep_events += members.size


class _Clock:
    """Per GPU: where its walk is (``now``), when its stream is free, its compute seconds."""

    def __init__(self, now: np.ndarray, free: np.ndarray, busy: np.ndarray) -> None:
        self.now, self.free, self.busy = now, free, busy
