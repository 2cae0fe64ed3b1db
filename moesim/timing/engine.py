"""The timing engine: one SimPy process per GPU and step, walking the layers in order.

Per layer, forward: attention -> (tp all-reduce) -> gate -> dispatch -> routed experts ->
shared experts -> combine -> (tp all-reduce) (with ``policies.overlap.shared_experts`` the
shared experts are queued on the compute stream before the dispatch, so they run while it is in
flight); a dense layer runs its FFN instead of the MoE
block. With two-batch overlap (``policies.overlap.micro_batches: 2``) each GPU runs one such
walk per micro-batch at once: they share the GPU's in-order compute stream and the network,
so one micro-batch's all-to-all proceeds while the other computes.

Training then walks the layers backwards with every compute piece doubled and the two
all-to-alls reversed. Steps are separated by a barrier (the next decode token, or the optimizer
step, needs every GPU). Consecutive compute pieces go to the compute stream as one event; their
individual spans are recorded arithmetically (or as they end, on a compute stream that
communication kernels slow down: :class:`moesim.timing.gpu.SharedSMStream`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simpy

from moesim.comm.alltoall import ALL_TO_ALL, Flows
from moesim.config.loading import ResolvedScenario
from moesim.hardware.topology import Topology
from moesim.metrics.collector import Collector
from moesim.routing.stage import RoutingStage, StepRouting
from moesim.timing import gradsync
from moesim.timing.costs import OpCostModel
from moesim.timing.gpu import GPU, SharedSMStream
from moesim.timing.lockstep import LockstepSteps
from moesim.timing.network import FlowNetwork
from moesim.timing.offload import OffloadTiming
from moesim.timing.plan import FlowBuilder, Layout, StepPlan, gpu_slot_tokens, make_plan
from moesim.timing.training import TrainingSteps

ProgressFn = Callable[[int, int], None]


@dataclass
class _Rendezvous:
    """GPUs gathering for one collective."""

    size: int
    arrived: dict[int, float] = field(default_factory=dict)
    events: dict[int, simpy.Event] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineSpec:
    """The scenario settings the engine's own logic reads, resolved once (the builders of
    plans, flows and costs read the model and hardware they need themselves).

    Attributes:
        steps: Steps to simulate.
        train: A training step (forward and backward collectives).
        seq_len: Tokens per sequence.
        dp: Data-parallel replicas.
        world: GPUs.
        gpus_per_node: GPUs per node.
        top_k: Experts per token.
        shared_overlap: Shared experts run while the dispatch is in flight.
        overlapped: Compute overlaps communication kernels (two micro-batches or shared experts).
        offload: Experts are offloaded behind an HBM cache.
        a2a_holds_sms: The all-to-all's kernels hold SMs while in flight.
        a2a_fixed_s: Fixed seconds each all-to-all call pays before its bytes move.
        nccl_fixed_s: Fixed seconds of an NCCL call (tensor-parallel all-reduce).
    """

    steps: int
    train: bool
    seq_len: int
    dp: int
    world: int
    gpus_per_node: int
    top_k: int
    shared_overlap: bool
    overlapped: bool
    offload: bool
    a2a_holds_sms: bool
    a2a_fixed_s: float
    nccl_fixed_s: float

    @classmethod
    def of(cls, r: ResolvedScenario) -> EngineSpec:
        """The spec of a resolved scenario."""
        s = r.scenario
        ov = s.policies.overlap
        a2a = ALL_TO_ALL.get(s.policies.all_to_all.type)
        fixed = r.hardware.kernels.collectives
        host = 0.0 if s.workload.cuda_graphs else fixed.host_sync_s
        nccl = fixed.nccl_launch_s + host
        a2a_fixed = {None: 0.0, "nccl_launch": nccl, "deepep_notify": fixed.deepep_notify_s}
        return cls(
            steps=s.workload.steps,
            train=s.workload.mode == "train",
            seq_len=s.workload.seq_len,
            dp=s.parallelism.dp,
            world=r.world,
            gpus_per_node=r.gpus_per_node,
            top_k=r.model.moe.top_k,
            shared_overlap=ov.shared_experts,
            overlapped=ov.micro_batches > 1
            or ov.shared_experts
            or s.policies.pipeline.schedule == "dualpipe",
            offload=s.policies.offload.enabled,
            a2a_holds_sms=a2a.holds_sms,
            a2a_fixed_s=a2a_fixed[a2a.fixed],
            nccl_fixed_s=nccl,
        )


class Engine(TrainingSteps, LockstepSteps):
    """Runs a scenario's steps through the SimPy model.

    Args:
        r: The resolved scenario.
        routing: The routing stage.
        costs: The compute-cost model.
        collector: Where hooks record.
    """

    def __init__(
        self, r: ResolvedScenario, routing: RoutingStage, costs: OpCostModel, collector: Collector
    ) -> None:
        self.r, self.routing, self.costs, self.col = r, routing, costs, collector
        self.spec = spec = EngineSpec.of(r)
        self.env = simpy.Environment()
        self.topology = Topology(r.hardware, r.scenario.cluster.nodes)
        eng = r.scenario.engine
        self.net = FlowNetwork(
            self.env, self.topology, eng.flow_tolerance, eng.isolated_transfers == "sharing"
        )
        self.layout = Layout.of(r)
        self.flows = FlowBuilder(r, self.layout)
        # compute meets communication kernels only when something overlaps them, and only
        # while they are in flight unless they hold their SMs for the whole step (then the
        # cost model prices compute on the SMs left)
        persistent = costs.opts.persistent_comm_sms
        rate = r.hardware.gpu.comm_compute_rate if spec.overlapped and not persistent else 1.0
        gpn = spec.gpus_per_node
        self.gpus = [GPU(self.env, g, g // gpn, rate) for g in range(spec.world)]
        self._rv: dict[tuple[Any, ...], _Rendezvous] = {}
        self._migrating = False
        self.offload: OffloadTiming | None = None
        self._pre: dict[tuple[Any, ...], tuple[Flows, Any] | None] = {}
        self._plans: list[StepPlan] = []
        self._migration: np.ndarray | None = None
        self.moe_index = {layer: i for i, layer in enumerate(r.model.moe_layers)}
        self.ops_s: dict[str, float] = {}  # op seconds summed over the steps run
        # training: data-parallel gradient buckets, their groups' leaders, the optimizer step
        self._buckets = gradsync.buckets(r) if spec.train else []
        self._bucket_of = {(b.kind, b.index): b for b in self._buckets}
        # in KINDS order, never a set's: string hashes, and so set order, change per process
        kinds = [k for k in gradsync.KINDS if any(b.kind == k for b in self._buckets)]
        self._leaders = {
            k: sorted({int(self._dp_group(k, g)[0]) for g in range(spec.world)}) for k in kinds
        }
        opt = r.scenario.policies.optimizer
        self._zero, self._early = opt.zero, opt.overlap_grad_reduce
        self._optimizer_s = gradsync.optimizer_seconds(r) if spec.train else 0.0
        self._syncs: dict[int, list[simpy.Event]] = {}  # a GPU's bucket reductions in flight
        self._tail: dict[tuple[int, str], simpy.Event] = {}  # the last of each kind
        self._walk_layers: set[int] | None = None  # the layers pipelined chunks walk
        self._params: dict[tuple[int, int, int, bool], simpy.Event] = {}  # ZeRO-3 gathers

    def run(self, progress: ProgressFn | None = None) -> None:
        """Simulate every step; ``progress(done, total)`` is called after each. Steps that
        are a fixed sequence per GPU run on arrays (:mod:`moesim.timing.lockstep`) unless
        ``engine.lockstep`` is off."""
        if self.r.scenario.engine.lockstep and self.lockstep_applies():
            self.run_lockstep(progress)
            return
        self.env.process(self._driver(progress))
        self.env.run()

    def _driver(self, progress: ProgressFn | None) -> Generator[simpy.Event, Any, None]:
        steps = self.spec.steps
        ahead: list[StepRouting] = []
        if self.spec.offload:
            ahead = [self.routing.step(s) for s in range(steps)]
            self.offload = OffloadTiming(
                self.r, self.routing, ahead, self.layout.replica, self.layout.rank, self.env
            )
        for step in range(steps):
            routing = ahead[step] if ahead else self.routing.step(step)
            on_gpu = None if self.offload is None else self.offload.gpu_slots(step, self.spec.world)
            per_gpu = gpu_slot_tokens(self.layout, routing)
            self._record_routing(step, routing, per_gpu.sum(axis=-1))
            # two-batch overlap runs (and prices) its micro-batches, not the whole batch
            micro = [
                make_plan(self.r, self.layout, self.costs, m, step) for m in routing.micro
            ] or [make_plan(self.r, self.layout, self.costs, routing, step, on_gpu, per_gpu)]
            for mp in micro:
                for op, sec in mp.ops.items():
                    self.ops_s[op] = self.ops_s.get(op, 0.0) + sec
            self._plans, self._migration = micro, routing.migration
            self._pre = self._precompute()
            self._migrating = routing.migration is not None
            start = self.env.now
            busy0 = np.array([g.compute.busy_s for g in self.gpus])
            slow0 = np.array([_slowed(g) for g in self.gpus])
            yield self.env.all_of(
                [self.env.process(self._gpu_step(g, step, micro)) for g in range(self.spec.world)]
            )
            busy = np.array([g.compute.busy_s for g in self.gpus]) - busy0
            slowed = np.array([_slowed(g) for g in self.gpus]) - slow0
            tokens = routing.batch.tokens_per_rank * self.layout.ep * self.spec.dp
            self.col.on_step(step, self.env.now - start, busy, tokens, slowed)
            if progress:
                progress(step + 1, steps)

    def _phases(self) -> tuple[str, ...]:
        return (
            ("dispatch", "combine", "combine_bwd", "dispatch_bwd")
            if self.spec.train
            else ("dispatch", "combine")
        )

    def _precompute(self) -> dict[tuple[Any, ...], tuple[Flows, Any] | None]:
        """Every collective of the step (its plans in ``_plans``, its expert migration in
        ``_migration``; keys: (micro-batch, layer, phase, first GPU of the group)) with its
        flows and, for isolated ones, their fluid schedule, computed together
        on numpy. On a compiled network, where each isolated transfer is scheduled on its own
        anyway, a collective's flows are only built when it starts (None here: the step's
        flows of a 1,024-GPU decode alone would take gigabytes)."""
        keys: list[tuple[Any, ...]] = []
        leaders = sorted({int(g[0]) for g in self.layout.ep_groups})
        walked = self._walk_layers
        for mb in range(len(self._plans)):
            for layer in self.moe_index:
                if walked is not None and layer not in walked:
                    continue
                keys += [(mb, layer, phase, g) for phase in self._phases() for g in leaders]
            if self.layout.tp > 1:
                tp = sorted({int(t[0]) for t in self.layout.tp_groups})
                keys += [(mb, "tp", "tp_comm", g) for g in tp]
        if self._migration is not None:
            keys += [(0, 0, "migrate", g) for g in leaders]
        for b in self._buckets:
            keys += [(0, (b.kind, b.index), "dp_reduce", g) for g in self._leaders[b.kind]]
        if self._zero in (1, 2):
            for kind, firsts in self._leaders.items():
                keys += [(0, (kind, "gather"), "dp_gather", g) for g in firsts]
        keys += self._param_keys()
        if self.net.compiled:
            return dict.fromkeys(keys)
        flows = [self._flows_of(k) for k in keys]
        finish = self.net.plan_isolated(flows)
        return {k: (f, fin) for k, f, fin in zip(keys, flows, finish, strict=True)}

    def _flows_of(self, key: tuple[Any, ...]) -> Flows:
        """The flows of the step's collective ``key`` (see :meth:`_precompute`)."""
        mb, layer, phase, g = key
        if phase == "migrate":
            assert self._migration is not None
            return self.flows.migration(self._migration, g)
        if phase == "tp_comm":
            return self.flows.tp_allreduce(self._plans[mb], g)
        if phase == "dp_param":
            return self._param_flows(layer, g)
        if phase in ("dp_reduce", "dp_gather"):
            kind, index = layer
            group = self._dp_group(kind, g)
            if phase == "dp_reduce":
                nbytes = gradsync.sync_bytes(
                    self.r, self._bucket_of[kind, index].params, group.size
                )
            else:
                held = sum(b.params for b in self._buckets if b.kind == kind)
                nbytes = gradsync.gather_bytes(self.r, held, group.size)
            return gradsync.ring(group, nbytes, self.spec.gpus_per_node)
        return self.flows.alltoall(self._plans[mb], self.moe_index[layer], g, phase)

    def _record_routing(self, step: int, routing: StepRouting, gpu_tokens: np.ndarray) -> None:
        lay = self.layout
        self.col.on_routing(
            step,
            routing,
            gpu_tokens,
            (lay.replica, lay.rank, lay.tp_rank, lay.tp),
            self.spec.top_k,
            self.spec.seq_len,
        )

    # --- one GPU, one step ------------------------------------------------------------
    def _gpu_step(
        self, g: int, step: int, plans: list[StepPlan]
    ) -> Generator[simpy.Event, Any, None]:
        if self._migrating:  # experts move to their new slots before the step
            yield from self._comm(g, step, 0, "migrate", 0)
        # buckets reduce during the backward pass when it is one walk (two micro-batches
        # finish their gradients together, at the end)
        early = self._early and len(plans) == 1
        if len(plans) == 1:
            yield from self._walk(g, step, plans[0], 0, early)
        else:  # two-batch overlap: the micro-batches share the GPU's streams
            yield self.env.all_of(
                [self.env.process(self._walk(g, step, p, mb, False)) for mb, p in enumerate(plans)]
            )
        if self.spec.train:
            yield from self._finish_gradients(g, step, early)

    def _walk(
        self, g: int, step: int, plan: StepPlan, mb: int, early: bool
    ) -> Generator[simpy.Event, Any, None]:
        """One micro-batch's pass over the layers (forward, then backward when training,
        starting each gradient bucket's reduction as its last layer's backward ends when
        ``early``)."""
        layers = range(self.r.model.num_layers)
        self._prefetch(g, step, layers, mb, False)
        for layer in layers:
            yield from self._layer(g, step, layer, plan, mb, backward=False)
        if self.spec.train:
            self._prefetch(g, step, reversed(layers), mb, True)
            for layer in reversed(layers):
                yield from self._layer(g, step, layer, plan, mb, backward=True)
                if early:
                    self._reduce(g, step, layer)

    def _layer(
        self, g: int, step: int, layer: int, plan: StepPlan, mb: int, backward: bool
    ) -> Generator[simpy.Event, Any, None]:
        yield from self._params_ready(g, layer, mb, backward)
        tp = self.layout.tp > 1
        moe = self.moe_index.get(layer)
        p = plan.backward if backward else None
        attn = [("attention", p["attention"] if p else plan.attention)]
        if moe is None:
            mlp_compute = [("dense_ffn", p["dense"] if p else plan.dense)]
        else:
            pre = [("gate", p["gate"] if p else plan.gate)]
            ex = p["experts"] if p else plan.experts
            experts = [
                ("expert_compute", float(ex[moe, g])),
                ("shared_expert", p["shared"] if p else plan.shared),
            ]
        if backward:  # mirror of the forward order
            if tp:
                yield from self._comm(g, step, layer, "tp_comm", mb)
            if moe is None:
                yield from self._compute(g, step, layer, mlp_compute, mb)
            else:
                yield from self._comm(g, step, layer, "combine_bwd", mb)
                yield from self._compute(g, step, layer, experts, mb)
                yield from self._comm(g, step, layer, "dispatch_bwd", mb)
                yield from self._compute(g, step, layer, pre, mb)
            if tp:
                yield from self._comm(g, step, layer, "tp_comm", mb)
            yield from self._compute(g, step, layer, attn, mb)
            return
        if moe is None:
            yield from self._compute(g, step, layer, attn if tp else attn + mlp_compute, mb)
            if tp:
                yield from self._comm(g, step, layer, "tp_comm", mb)
                yield from self._compute(g, step, layer, mlp_compute, mb)
        else:
            if tp:
                yield from self._compute(g, step, layer, attn, mb)
                yield from self._comm(g, step, layer, "tp_comm", mb)
            yield from self._compute(g, step, layer, pre if tp else attn + pre, mb)
            ready = None if self.offload is None else self.offload.issue(g, step, moe)
            if self.spec.shared_overlap and plan.shared > 0:
                # queue the shared experts now: they run while the dispatch is in flight
                self._submit(g, step, layer, [experts.pop()], mb)
            yield from self._comm(g, step, layer, "dispatch", mb)
            yield from self._offload_wait(g, step, layer, ready)
            host = None if self.offload is None else self.offload.cpu(g, step, moe)
            yield from self._compute(g, step, layer, experts, mb)
            yield from self._offload_wait(g, step, layer, host)  # experts run on the CPUs
            yield from self._comm(g, step, layer, "combine", mb)
        if tp:
            yield from self._comm(g, step, layer, "tp_comm", mb)

    def _offload_wait(
        self, g: int, step: int, layer: int, ev: simpy.Event | None
    ) -> Generator[simpy.Event, Any, None]:
        """Wait for expert copies or host-run experts (``offload_wait``), if any."""
        if ev is not None:
            arrive = self.env.now
            yield ev
            self.col.on_phase(step, layer, g, "offload_wait", arrive, self.env.now)

    def _submit(
        self, g: int, step: int, layer: int, pieces: list[tuple[str, float]], mb: int
    ) -> simpy.Event:
        """Queue ``pieces`` on ``g``'s compute stream; the event at their end."""

        def span(phase: str, start: float, end: float) -> None:
            self.col.on_phase(step, layer, g, phase, start, end, mb)

        return self.gpus[g].compute.run(pieces, span)

    def _compute(
        self, g: int, step: int, layer: int, pieces: list[tuple[str, float]], mb: int
    ) -> Generator[simpy.Event, Any, None]:
        yield self._submit(g, step, layer, pieces, mb)

    def _comm(
        self,
        g: int,
        step: int,
        layer: int,
        phase: str,
        mb: int,
        group: np.ndarray | None = None,
        slot: tuple[str, Any] | None = None,
        side: bool = False,
    ) -> Generator[simpy.Event, Any, None]:
        """Take part in a collective: the EP group's all-to-all phases, the TP all-reduce, or
        (``group``, ``slot``: which bucket) a data-parallel reduction; ``side``: off the
        GPU's walk (overlapped), so its waiting is no straggler wait of the walk."""
        arrive = self.env.now
        tp = phase == "tp_comm"
        nccl = tp or phase.startswith("dp_")
        fixed = (
            0.0 if phase == "migrate" else self.spec.nccl_fixed_s if nccl else self.spec.a2a_fixed_s
        )
        if group is not None:
            members = group
        else:
            members = self.layout.tp_group(g) if tp else self.layout.ep_group(g)
        tag = slot if slot is not None else layer
        key = (step, mb, tag, phase, int(members[0]))
        pre = (mb, "tp" if tp else tag, phase, int(members[0]))
        ev = self._join(key, g, members, pre, step, layer, fixed)
        holds = nccl or phase == "migrate" or self.spec.a2a_holds_sms
        sms = self.gpus[g].compute if holds else None
        if isinstance(sms, SharedSMStream):  # the collective's kernel holds SMs until it ends
            sms.comm_started()
        started = yield ev
        if isinstance(sms, SharedSMStream):
            sms.comm_ended()
        if not side:
            self.col.on_wait(step, g, started - arrive)
        name = "tp_comm" if tp else "dp_comm" if nccl else phase.removesuffix("_bwd")
        self.col.on_phase(step, layer, g, name, arrive, self.env.now, mb)

    def _join(
        self,
        key: tuple[Any, ...],
        g: int,
        members: np.ndarray,
        pre: tuple[Any, ...],
        step: int,
        layer: int,
        fixed: float,
    ) -> simpy.Event:
        """Join the collective ``key``; the last member to arrive starts it, ``fixed`` seconds
        (launch, handshake) before its bytes move."""
        rv = self._rv.get(key)
        if rv is None:
            rv = self._rv[key] = _Rendezvous(size=members.size)
        ev = self.env.event()
        rv.arrived[g], rv.events[g] = self.env.now, ev
        if len(rv.arrived) == rv.size:
            del self._rv[key]
            planned = self._pre[pre]
            flows, finish = (self._flows_of(pre), None) if planned is None else planned
            self.col.on_flows(
                step,
                layer,
                flows.src,
                flows.dst,
                flows.nbytes,
                self.spec.gpus_per_node,
                data_parallel=str(key[3]).startswith("dp_"),
            )
            start = self.env.now

            def done(gpu: int, _at: float) -> None:
                rv.events[gpu].succeed(start)

            if fixed > 0:  # one timer for the whole group
                timer = self.env.timeout(fixed)
                timer.callbacks.append(lambda _e: self.net.transfer(flows, members, done, finish))
            else:
                self.net.transfer(flows, members, done, finish)
        return ev


def _slowed(gpu: GPU) -> float:
    """Seconds ``gpu``'s compute has lost to communication kernels holding SMs so far."""
    return gpu.compute.slowed_s if isinstance(gpu.compute, SharedSMStream) else 0.0
