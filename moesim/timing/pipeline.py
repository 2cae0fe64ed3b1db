"""Pipeline schedules of a training step, and the times they give.

The layers are cut into chunks in model order (:func:`split_layers`); a micro-batch passes
through the chunks one after another, each on its pipeline stage (its *path*). A schedule is,
for every stage, the order in which it runs its pieces of work (:class:`Part`):

- ``F``: the forward pass of one micro-batch through one chunk;
- ``B``: its backward pass (input and weight gradients);
- ``Bi`` and ``W``: the backward pass split as zero-bubble schedules do (Qi et al., arXiv
  2401.10241): ``Bi`` computes the input gradients the stage before needs, ``W`` the weight
  gradients, later, to fill a bubble.

An op is one part, or (DualPipe) a forward and a backward part run at once on the same GPUs,
so that each one's all-to-alls hide behind the other's compute.

Schedules, as their reference implementations order them:

- ``1f1b`` (PipeDream-flush; Narayanan et al., arXiv 2104.04473, section 2.2.1; Megatron-Core
  ``forward_backward_pipelining_without_interleaving``): stage ``s`` runs ``pp - s - 1``
  warm-up forwards, then alternates one forward and one backward, then drains the backwards.
  Idle time per stage with uniform chunks: ``(pp - 1)(F + B)``.
- ``interleaved`` (the same paper, section 2.2.2; Megatron-Core
  ``forward_backward_pipelining_with_interleaving``): ``vpp`` chunks per stage, chunk ``c`` on
  stage ``c % pp``; micro-batches enter in groups of ``pp``; stage ``s`` warms up with
  ``2 (pp - s - 1) + (vpp - 1) pp`` forwards (all of them when there are ``pp``
  micro-batches). Idle time: ``(pp - 1)(F + B) / vpp`` for a whole-model ``F``, ``B``.
- ``dualpipe`` (DeepSeek-V3, arXiv 2412.19437, section 3.2.1; the eight steps of
  ``DualPipe.step`` in github.com/deepseek-ai/DualPipe): half of the micro-batches enter at
  the first stage, half at the last; stage ``r`` holds chunk ``r`` for the first direction and
  chunk ``pp - 1 - r`` for the other (two copies of parameters). Idle time:
  ``(pp/2 - 1)(F&B + B - 3W)``.

:func:`run_schedule` times a schedule exactly for given op durations and point-to-point
times: each stage runs its ops in order, each as soon as the stage is free and its inputs have
arrived (the activations from the previous chunk's stage, the gradients from the next one's).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moesim.config.resolved import ResolvedScenario

SCHEDULES = ("1f1b", "interleaved", "dualpipe")


@dataclass(frozen=True)
class Part:
    """One piece of work: ``kind`` (F, B, Bi or W) of micro-batch ``mb`` at position ``pos``
    of its path."""

    kind: str
    mb: int
    pos: int


Op = tuple[Part, ...]


@dataclass(frozen=True)
class Schedule:
    """A pipeline schedule.

    Attributes:
        name: The schedule.
        pp: Pipeline stages.
        micro_batches: Micro-batches per step.
        paths: Per micro-batch, the ``(stage, chunk)`` it passes, in order.
        order: Per stage, its ops in the order it runs them.
    """

    name: str
    pp: int
    micro_batches: int
    paths: list[list[tuple[int, int]]]
    order: list[list[Op]]

    def stage_chunks(self, stage: int) -> list[int]:
        """Chunks ``stage`` holds, ascending."""
        return sorted({c for path in self.paths for s, c in path if s == stage})

    def chunk(self, part: Part) -> int:
        """The chunk ``part`` runs."""
        return self.paths[part.mb][part.pos][1]


def chunk_count(pp: int, vpp: int, schedule: str) -> int:
    """Chunks the layers are cut into: ``pp * vpp``, or ``pp`` for DualPipe (each stage holds
    two of them, one per direction)."""
    return pp if schedule == "dualpipe" else pp * vpp


def split_layers(
    layers: int, chunks: int, layout: list[int] | None = None, paired: bool = False
) -> list[range]:
    """The layers of each chunk: ``layout`` if given, else as even as possible with the
    shortfall taken from the first and last chunks first (they also hold the embedding and
    the output layer), then the second and second-to-last, and so on. ``paired`` (DualPipe,
    where stage ``r`` holds chunks ``r`` and ``chunks - 1 - r``): one chunk of each pair
    first (chunk 0, then ``chunks - 2``, 2, ...), so that the stages' layers differ by one at
    most."""
    if layout is None:
        base = -(-layers // chunks)
        sizes = [base] * chunks
        short = base * chunks - layers
        if paired:
            half = range(chunks // 2)
            first = [i if i % 2 == 0 else chunks - 1 - i for i in half]
            order = first + [chunks - 1 - i if i % 2 == 0 else i for i in half]
        else:
            ends = [x for i in range(chunks) for x in (i, chunks - 1 - i)]
            order = list(dict.fromkeys(ends))
        i = 0
        while short:
            c = order[i % chunks]
            if sizes[c] > 1:
                sizes[c] -= 1
                short -= 1
            i += 1
    else:
        sizes = list(layout)
    if sum(sizes) != layers or len(sizes) != chunks:
        raise ValueError(f"layout {sizes} does not cut {layers} layers into {chunks} chunks")
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    return out


def make_schedule(name: str, pp: int, vpp: int, micro_batches: int) -> Schedule:
    """The schedule ``name`` for ``pp`` stages, ``vpp`` virtual stages and ``micro_batches``."""
    if name == "dualpipe":
        return _dualpipe(pp, micro_batches)
    if name == "interleaved" and vpp > 1:
        return _interleaved(pp, vpp, micro_batches)
    return _interleaved(pp, 1, micro_batches, "1f1b")


def _interleaved(pp: int, vpp: int, m: int, name: str = "interleaved") -> Schedule:
    """1F1B over ``vpp`` chunks per stage (``vpp`` 1: plain 1F1B), in Megatron-Core's order."""
    chunks = pp * vpp
    paths = [[(c % pp, c) for c in range(chunks)] for _ in range(m)]
    total = m * vpp
    order: list[list[Op]] = []
    for s in range(pp):

        def part(kind: str, k: int, s: int = s) -> Op:
            group, within = divmod(k, pp * vpp)
            v = within // pp
            if kind == "B":
                v = vpp - 1 - v
            return (Part(kind, group * pp + within % pp, v * pp + s),)

        if vpp == 1:
            warm = min(pp - s - 1, m)
        elif m == pp:
            warm = total
        else:
            warm = min(2 * (pp - s - 1) + (vpp - 1) * pp, total)
        ops = [part("F", k) for k in range(warm)]
        for i in range(total - warm):
            ops += [part("F", warm + i), part("B", i)]
        ops += [part("B", k) for k in range(total - warm, total)]
        order.append(ops)
    return Schedule(name, pp, m, paths, order)


def _dualpipe(pp: int, m: int) -> Schedule:
    """DualPipe's eight steps per rank (``DualPipe.step``), with ``m / 2`` micro-batches in
    each direction."""
    if pp % 2 or m % 2 or m < 2 * pp:
        raise ValueError(
            f"DualPipe needs an even pp and an even micro-batch count >= 2 pp: {pp}, {m}"
        )
    half, nh = m // 2, pp // 2
    paths = [[(r, r) for r in range(pp)] for _ in range(half)]
    paths += [[(pp - 1 - j, j) for j in range(pp)] for _ in range(half)]
    order: list[list[Op]] = []
    for r in range(pp):
        second = int(r >= nh)
        h = min(r, pp - 1 - r)
        middle = r in (nh - 1, nh)
        fcount, bcount = [0, 0], [0, 0]
        weights: deque[Part] = deque()
        ops: list[Op] = []

        def pos(d: int, r: int = r) -> int:
            return r if d == 0 else pp - 1 - r

        def fwd(phase: int, second: int = second, fcount: list[int] = fcount) -> Part:
            d = phase ^ second
            mb = d * half + fcount[d]
            fcount[d] += 1
            return Part("F", mb, pos(d))

        def bwd(
            phase: int,
            zb: bool = False,
            second: int = second,
            bcount: list[int] = bcount,
            weights: deque[Part] = weights,
        ) -> Part:
            d = phase ^ second
            mb = d * half + bcount[d]
            bcount[d] += 1
            if zb:
                weights.append(Part("W", mb, pos(d)))
            return Part("Bi" if zb else "B", mb, pos(d))

        for _ in range((nh - h - 1) * 2):  # 1: nF0
            ops.append((fwd(0),))
        for _ in range(h + 1):  # 2: nF0F1
            ops += [(fwd(0),), (fwd(1),)]
        for _ in range(nh - h - 1):  # 3: nB1W1F1, zero bubble
            ops.append((bwd(1, True),))
            ops.append((weights.popleft(),))
            ops.append((fwd(1),))
        for i in range(half - pp + h + 1):  # 4: nF0B1F1B0
            if i == 0 and middle:  # not overlapped, to shorten the bubble
                ops += [(fwd(0),), (bwd(1),)]
            else:
                ops.append((fwd(0), bwd(1)))
            ops.append((fwd(1), bwd(0)))
        for _ in range(nh - h - 1):  # 5: nB1F1B0
            ops.append((bwd(1),))
            ops.append((fwd(1), bwd(0)))
        zb = False
        steps6 = h + 1
        for i in range(steps6):  # 6: nB1B0, the second half zero bubble
            if i == steps6 // 2 and h % 2 == 1:
                zb = True
            ops.append((bwd(1, zb),))
            if i == steps6 // 2 and h % 2 == 0:
                zb = True
            ops.append((bwd(0, zb),))
        for _ in range(nh - h - 1):  # 7: nWB0, zero bubble
            ops.append((weights.popleft(),))
            ops.append((bwd(0, True),))
        while weights:  # 8: nW
            ops.append((weights.popleft(),))
        order.append(ops)
    return Schedule("dualpipe", pp, m, paths, order)


@dataclass(frozen=True)
class Timed:
    """An op of a stage with its start and end, seconds."""

    op: Op
    start: float
    end: float


def run_schedule(
    sched: Schedule,
    duration: Callable[[Op, int], float],
    p2p: Callable[[int, int], float],
) -> list[list[Timed]]:
    """Time ``sched``: per stage, its ops with their start and end.

    Args:
        duration: Seconds of an op on a stage.
        p2p: Seconds to send one micro-batch's activations (or their gradients) from one
            stage to another.

    Raises:
        RuntimeError: the schedule waits on itself (a schedule bug).
    """
    f_end: dict[tuple[int, int], float] = {}
    b_end: dict[tuple[int, int], float] = {}
    ptr = [0] * sched.pp
    free = [0.0] * sched.pp
    out: list[list[Timed]] = [[] for _ in range(sched.pp)]

    def ready(part: Part) -> float | None:
        path = sched.paths[part.mb]
        here = path[part.pos][0]
        if part.kind == "F":
            if part.pos == 0:
                return 0.0
            t = f_end.get((part.mb, part.pos - 1))
            return None if t is None else t + _hop(p2p, path[part.pos - 1][0], here)
        if part.kind == "W":
            return b_end.get((part.mb, part.pos))
        if part.pos == len(path) - 1:  # the loss: after this chunk's own forward
            return f_end.get((part.mb, part.pos))
        t = b_end.get((part.mb, part.pos + 1))
        return None if t is None else t + _hop(p2p, path[part.pos + 1][0], here)

    remaining = sum(len(o) for o in sched.order)
    while remaining:
        progress = False
        for s in range(sched.pp):
            while ptr[s] < len(sched.order[s]):
                op = sched.order[s][ptr[s]]
                times = [ready(p) for p in op]
                if any(t is None for t in times):
                    break
                start = max([free[s], *(t for t in times if t is not None)])
                end = start + duration(op, s)
                for p in op:
                    if p.kind == "F":
                        f_end[p.mb, p.pos] = end
                    elif p.kind in ("B", "Bi"):
                        b_end[p.mb, p.pos] = end
                out[s].append(Timed(op, start, end))
                free[s], ptr[s] = end, ptr[s] + 1
                remaining -= 1
                progress = True
        if not progress:
            raise RuntimeError(f"schedule {sched.name} deadlocks at ops {ptr}")
    return out


def _hop(p2p: Callable[[int, int], float], src: int, dst: int) -> float:
    return 0.0 if src == dst else p2p(src, dst)


def idle_seconds(timed: list[list[Timed]], end: float | None = None) -> list[float]:
    """Per stage, the seconds it runs no op before ``end`` (default: the last op's end on any
    stage): the pipeline bubble."""
    finish = max(t[-1].end for t in timed if t) if end is None else end
    return [finish - sum(x.end - x.start for x in t) for t in timed]


def pipelined(r: ResolvedScenario) -> bool:
    """Whether a scenario's steps run through the pipeline schedule (pipeline stages or
    gradient accumulation)."""
    w = r.scenario.workload
    return w.mode == "train" and (r.scenario.parallelism.pp > 1 or w.micro_batches > 1)


def stage_scenario(r: ResolvedScenario) -> ResolvedScenario:
    """The scenario of one pipeline stage: its GPUs (``dp * ep * tp``) on their nodes."""
    s = r.scenario
    par = s.parallelism
    nodes = max(1, par.stage_world // r.gpus_per_node)
    stage = s.model_copy(
        update={
            "parallelism": par.model_copy(update={"pp": 1, "vpp": 1, "pp_layout": None}),
            "cluster": s.cluster.model_copy(update={"nodes": nodes}),
        }
    )
    return dataclasses.replace(r, scenario=stage)


def schedule_of(r: ResolvedScenario) -> tuple[Schedule, list[range]]:
    """The scenario's pipeline schedule and the layers of each chunk."""
    s = r.scenario
    par = s.parallelism
    name = s.policies.pipeline.schedule if par.pp > 1 else "1f1b"
    sched = make_schedule(name, par.pp, par.vpp, s.workload.micro_batches)
    count = chunk_count(par.pp, par.vpp, name)
    chunks = split_layers(r.model.num_layers, count, par.pp_layout, paired=name == "dualpipe")
    return sched, chunks


def stage_layers(sched: Schedule, chunks: list[range]) -> list[list[int]]:
    """The layers each stage holds."""
    return [[x for c in sched.stage_chunks(s) for x in chunks[c]] for s in range(sched.pp)]


def peak_in_flight(sched: Schedule, stage: int, chunk_bytes: Callable[[int], float]) -> float:
    """Most activation bytes ``stage`` holds at once under ``sched``: a forward part keeps its
    chunk's activations (``chunk_bytes(chunk)`` per micro-batch) until the backward part of
    the same micro-batch and chunk frees them (1F1B's first stage holds ``pp`` micro-batches,
    DualPipe's ``pp + 1`` chunks)."""
    held = peak = 0.0
    for op in sched.order[stage]:
        for p in op:
            if p.kind == "F":
                held += chunk_bytes(sched.chunk(p))
        peak = max(peak, held)
        for p in op:
            if p.kind in ("B", "Bi"):
                held -= chunk_bytes(sched.chunk(p))
    return peak
