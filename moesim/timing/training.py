"""The training side of the engine: data-parallel gradients, the optimizer step, ZeRO-3's
parameter gathers, and the pipelined ops that :mod:`moesim.timing.stages` times.

:class:`TrainingSteps` is a mixin of :class:`moesim.timing.engine.Engine`: it uses the
engine's environment, layout, collectives (``_comm``) and compute stream (``_compute``), and
the engine calls it from its walks. What each collective moves is in
:mod:`moesim.timing.gradsync`.

ZeRO-3 (``policies.optimizer.zero: 3``, Rajbhandari et al., arXiv 1910.02054, section 5.3)
keeps a ``1/n`` share of every parameter: before a layer runs, forward or backward, its
parameters are all-gathered over their data-parallel groups (dense and expert apart, as the
gradients). The gathers of a walk are issued when it starts, one layer after another on the
data-parallel stream (as FSDP prefetches), so a layer's gather overlaps the layers before it
and a layer waits only for what has not arrived; the gradients are reduce-scattered as with
ZeRO-2 and nothing is gathered after the optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import simpy

from moesim.comm.alltoall import Flows
from moesim.timing import gradsync

if TYPE_CHECKING:
    from moesim.config.loading import ResolvedScenario
    from moesim.timing.plan import Layout, StepPlan


class TrainingSteps:
    """Training methods of the engine (see the module docstring)."""

    if TYPE_CHECKING:  # set by the engine
        r: ResolvedScenario
        env: simpy.Environment
        spec: Any  # moesim.timing.engine.EngineSpec
        layout: Layout
        _buckets: list[gradsync.Bucket]
        _bucket_of: dict[tuple[str, Any], gradsync.Bucket]
        _leaders: dict[str, list[int]]
        _zero: int
        _optimizer_s: float
        _syncs: dict[int, list[simpy.Event]]
        _tail: dict[tuple[int, str], simpy.Event]
        _plans: list[StepPlan]
        _migration: np.ndarray | None
        _migrating: bool
        _walk_layers: set[int] | None
        _pre: dict[tuple[Any, ...], tuple[Flows, Any] | None]

        def _precompute(self) -> dict[tuple[Any, ...], tuple[Flows, Any] | None]: ...

        def _layer(
            self, g: int, step: int, layer: int, plan: StepPlan, mb: int, backward: bool
        ) -> Generator[simpy.Event, Any, None]: ...

        def _compute(
            self, g: int, step: int, layer: int, pieces: list[tuple[str, float]], mb: int
        ) -> Generator[simpy.Event, Any, None]: ...

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
        ) -> Generator[simpy.Event, Any, None]: ...

    _params: dict[tuple[int, int, int, bool], simpy.Event]  # ZeRO-3 gathers in flight
    _held: tuple[np.ndarray, np.ndarray] | None = None  # parameters per layer, by kind

    # --- pipelined training: ops timed one at a time (moesim.timing.stages) ---------------
    def time_walks(self, step: int, walks: Sequence[tuple[StepPlan, Sequence[int], bool]]) -> float:
        """Run ``walks`` (plan, layers, backward) at once on every GPU, as one pipeline op
        (a forward or backward chunk, or DualPipe's forward and backward chunks overlapped
        on the same GPUs); the seconds from their start to the last GPU's end."""
        self._plans, self._migration, self._migrating = [w[0] for w in walks], None, False
        self._walk_layers = {layer for w in walks for layer in w[1]}
        self._pre = self._precompute()
        return self._on_every_gpu(lambda g: self._chunks(g, step, walks))

    def time_gradients(
        self, step: int, buckets: list[gradsync.Bucket], optimizer_s: float
    ) -> float:
        """Reduce ``buckets`` over their data-parallel groups, run the optimizer step
        (``optimizer_s``) and gather the weights on every GPU: a pipeline stage's work after
        its last backward op; the seconds it takes."""
        self._buckets, self._optimizer_s = buckets, optimizer_s
        self._bucket_of = {(b.kind, b.index): b for b in buckets}
        self._plans, self._migration, self._migrating = [], None, False
        self._pre = self._precompute()
        return self._on_every_gpu(lambda g: self._finish_gradients(g, step, False))

    def _on_every_gpu(self, work: Callable[[int], Generator[simpy.Event, Any, None]]) -> float:
        """Run ``work(g)`` on every GPU from now; the seconds until the last one ends."""
        start = self.env.now
        procs = [self.env.process(work(g)) for g in range(self.spec.world)]
        self.env.run(until=self.env.all_of(procs))
        return self.env.now - start

    def _chunks(
        self, g: int, step: int, walks: Sequence[tuple[StepPlan, Sequence[int], bool]]
    ) -> Generator[simpy.Event, Any, None]:
        if len(walks) == 1:
            yield from self._chunk(g, step, *walks[0], 0)
            return
        yield self.env.all_of(
            [self.env.process(self._chunk(g, step, *w, mb)) for mb, w in enumerate(walks)]
        )

    def _chunk(
        self, g: int, step: int, plan: StepPlan, layers: Sequence[int], backward: bool, mb: int
    ) -> Generator[simpy.Event, Any, None]:
        order = list(reversed(layers)) if backward else list(layers)
        self._prefetch(g, step, order, mb, backward)
        for layer in order:
            yield from self._layer(g, step, layer, plan, mb, backward)

    # --- data-parallel gradients and the optimizer ---------------------------------------
    def _dp_group(self, kind: str, g: int) -> np.ndarray:
        return gradsync.group_of(kind, g, self.layout.rank, self.layout.tp_rank)

    def _reduce(self, g: int, step: int, layer: int | None) -> None:
        """Start the reductions of ``g``'s buckets that ``layer``'s backward pass completes
        (None: all); each waits for the one before it of its kind (one NCCL stream per
        group)."""
        for b in self._buckets:
            if layer is None or b.layer == layer:
                before = self._tail.get((g, b.kind))
                ev = self.env.process(self._bucket(g, step, b, before))
                self._tail[g, b.kind] = ev
                self._syncs.setdefault(g, []).append(ev)

    def _bucket(
        self, g: int, step: int, b: gradsync.Bucket, before: simpy.Event | None
    ) -> Generator[simpy.Event, Any, None]:
        if before is not None:
            yield before
        group = self._dp_group(b.kind, g)
        yield from self._comm(
            g, step, b.layer, "dp_reduce", 0, group=group, slot=(b.kind, b.index), side=True
        )

    def _finish_gradients(
        self, g: int, step: int, early: bool
    ) -> Generator[simpy.Event, Any, None]:
        """Wait for the gradient reductions, run the optimizer step, gather the updated
        weights (ZeRO-1 and -2)."""
        if not early:
            self._reduce(g, step, None)
        pending = self._syncs.pop(g, [])
        for kind in gradsync.KINDS:
            self._tail.pop((g, kind), None)
        if pending:
            yield self.env.all_of(pending)
        yield from self._compute(g, step, 0, [("optimizer", self._optimizer_s)], 0)
        if self._zero in (1, 2):
            for kind in self._leaders:
                yield from self._comm(
                    g, step, 0, "dp_gather", 0, group=self._dp_group(kind, g), slot=(kind, "gather")
                )

    # --- ZeRO-3: parameters gathered before each layer runs --------------------------------
    def _param_kinds(self, layer: int) -> list[str]:
        """The kinds of parameters ``layer`` holds whose groups have more than one GPU."""
        per_kind = self._layer_params()
        return [k for k in self._leaders if per_kind[gradsync.KINDS.index(k)][layer] > 0]

    def _layer_params(self) -> tuple[np.ndarray, np.ndarray]:
        if self._held is None:
            self._held = gradsync.layer_params(self.r)
        return self._held

    def _prefetch(self, g: int, step: int, layers: Iterable[int], mb: int, backward: bool) -> None:
        """ZeRO-3: start gathering the parameters of ``layers`` (in the order a walk uses
        them), one layer after another; :meth:`_params_ready` waits for a layer's."""
        if self._zero != 3:
            return
        before: simpy.Event | None = None
        for layer in layers:
            kinds = self._param_kinds(layer)
            if not kinds:
                continue
            ev = self.env.process(self._gather(g, step, layer, kinds, mb, backward, before))
            self._params[g, layer, mb, backward] = before = ev

    def _gather(
        self,
        g: int,
        step: int,
        layer: int,
        kinds: list[str],
        mb: int,
        backward: bool,
        before: simpy.Event | None,
    ) -> Generator[simpy.Event, Any, None]:
        if before is not None:
            yield before
        for kind in kinds:
            slot = (kind, (layer, mb, backward))
            yield from self._comm(
                g, step, layer, "dp_param", 0, group=self._dp_group(kind, g), slot=slot, side=True
            )

    def _params_ready(
        self, g: int, layer: int, mb: int, backward: bool
    ) -> Generator[simpy.Event, Any, None]:
        """Wait until ``layer``'s parameters have been gathered (ZeRO-3)."""
        if self._zero != 3:
            return
        ev = self._params.pop((g, layer, mb, backward), None)
        if ev is not None and not ev.processed:
            yield ev

    def _param_keys(self) -> list[tuple[Any, ...]]:
        """The ZeRO-3 gathers of the walks to come, for :meth:`Engine._precompute`."""
        if self._zero != 3:
            return []
        layers = self._walk_layers or range(self.r.model.num_layers)
        directions = (False, True) if self.spec.train else (False,)
        keys: list[tuple[Any, ...]] = []
        for mb in range(len(self._plans)):
            for layer in layers:
                for kind in self._param_kinds(layer):
                    for backward in directions:
                        slot = (kind, (layer, mb, backward))
                        keys += [(0, slot, "dp_param", g) for g in self._leaders[kind]]
        return keys

    def _param_flows(self, slot: tuple[str, Any], g: int) -> Flows:
        """A ZeRO-3 gather's ring: each GPU sends ``(n-1)/n`` of the layer's parameters of the
        kind, in the weight dtype."""
        kind, (layer, _mb, _backward) = slot
        group = self._dp_group(kind, g)
        params = self._layer_params()[gradsync.KINDS.index(kind)][layer]
        nbytes = gradsync.param_gather_bytes(self.r, float(params), group.size)
        return gradsync.ring(group, nbytes, self.spec.gpus_per_node)
