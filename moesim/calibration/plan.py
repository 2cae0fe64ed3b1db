"""What a calibration measures: expert shapes, dtypes and per-expert token-count vectors.

A *case* is one grouped expert FFN call: ``E`` experts of one shape, each given ``counts[i]``
tokens. Uniform cases (every expert the same count, log-spaced from 1 to ``max_tokens``) give
the table's grid; uneven cases (Zipf and Dirichlet draws of the same totals) test that the time
depends on the whole per-expert vector, and 10% of all cases, drawn from the uneven ones, are
held out of the fit to check it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moesim.models.spec import ModelSpec

HOLDOUT_FRACTION = 0.10


@dataclass(frozen=True)
class ExpertShape:
    """One expert FFN as one GPU computes it: ``matrices`` weight matrices ``hidden x width``
    (gate and up fused into one ``hidden x 2*width`` GEMM when ``matrices == 3``), an
    activation, then ``width x hidden`` down."""

    hidden: int
    width: int
    matrices: int
    dtype: str

    @property
    def key(self) -> str:
        return f"h{self.hidden}-w{self.width}-m{self.matrices}-{self.dtype}"

    def flops(self, tokens: float) -> float:
        return 2.0 * tokens * self.matrices * self.hidden * self.width


def record_key(record: dict[str, Any]) -> str:
    """The shape key of a raw measurement record (a case's JSON with its results)."""
    return ExpertShape(record["hidden"], record["width"], record["matrices"], record["dtype"]).key


@dataclass(frozen=True)
class Case:
    """One measured call: ``counts[i]`` tokens to expert ``i``."""

    shape: ExpertShape
    counts: tuple[int, ...]
    label: str
    holdout: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            **asdict(self.shape),
            "counts": list(self.counts),
            "label": self.label,
            "holdout": self.holdout,
        }


@dataclass(frozen=True)
class GemmCase:
    """One dense GEMM: ``m`` tokens by ``(n, k)`` in ``dtype`` (a point of a GEMM table)."""

    m: int
    n: int
    k: int
    dtype: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k


@dataclass
class Plan:
    """Everything one calibration run measures."""

    cases: list[Case]
    copy_bytes: int
    host_copy_bytes: int
    repeats: int
    warmup: int
    alltoall_bytes: list[int] = field(default_factory=list)
    gemms: list[GemmCase] = field(default_factory=list)

    def shapes(self) -> list[ExpertShape]:
        seen: dict[str, ExpertShape] = {}
        for c in self.cases:
            seen.setdefault(c.shape.key, c.shape)
        return list(seen.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "cases": [c.as_json() for c in self.cases],
            "copy_bytes": self.copy_bytes,
            "host_copy_bytes": self.host_copy_bytes,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "alltoall_bytes": self.alltoall_bytes,
            "gemms": [g.as_json() for g in self.gemms],
        }


def token_grid(max_tokens: int) -> list[int]:
    """Log-spaced tokens per expert: powers of two and their 1.5x midpoints up to the max."""
    out = {1}
    p = 1
    while p <= max_tokens:
        out.add(p)
        if p * 3 // 2 <= max_tokens and p >= 2:
            out.add(p * 3 // 2)
        p *= 2
    out.add(max_tokens)
    return sorted(out)


def shapes_for(model: ModelSpec, tp: int, dtypes: list[str]) -> list[ExpertShape]:
    """The routed-expert shape of ``model`` on one GPU (width split by ``tp``) per dtype."""
    width = model.moe.expert_intermediate_size // tp
    if width < 1:
        raise ValueError(f"tp {tp} exceeds the expert width {model.moe.expert_intermediate_size}")
    return [ExpertShape(model.hidden_size, width, model.moe.matrices, d) for d in dtypes]


def uneven_counts(rng: np.random.Generator, experts: int, total: int, kind: str) -> tuple[int, ...]:
    """``total`` tokens over ``experts`` experts, skewed the way real routing is."""
    if kind.startswith("zipf"):
        s = float(kind[4:])
        p = 1.0 / np.arange(1, experts + 1) ** s
        p = rng.permutation(p / p.sum())
    else:  # dirichlet<alpha>
        p = rng.dirichlet(np.full(experts, float(kind[9:])))
    return tuple(int(x) for x in rng.multinomial(total, p))


UNEVEN_KINDS = ("zipf0.8", "zipf1.5", "dirichlet0.3", "dirichlet2.0")


def gemm_cases(shapes: list[tuple[int, int]], dtypes: list[str], max_tokens: int) -> list[GemmCase]:
    """Dense GEMMs of every ``(n, k)`` and dtype at ``m`` = 1, 2, 4, ... up to ``max_tokens``:
    the points of the profile's GEMM tables (``kernels.gemm``)."""
    ms = [1 << i for i in range(max(max_tokens, 1).bit_length()) if 1 << i <= max_tokens]
    return [GemmCase(m, n, k, d) for d in dtypes for n, k in sorted(set(shapes)) for m in ms]


def make_plan(
    shapes: list[ExpertShape],
    experts: int,
    max_tokens: int,
    seed: int = 0,
    repeats: int = 20,
    warmup: int = 3,
    copy_bytes: int = 1 << 30,
    host_copy_bytes: int = 256 << 20,
    alltoall_bytes: list[int] | None = None,
    gemm_shapes: list[tuple[int, int]] | None = None,
) -> Plan:
    """Cases for every shape: the uniform grid, then uneven draws (four skews) at every other
    grid total; 10% of each shape's cases, drawn from its uneven ones, are held out. With
    ``gemm_shapes``, dense GEMMs of those ``(n, k)`` in every shape's dtype too."""
    if experts < 2:
        raise ValueError("experts must be >= 2 so that uneven token vectors exist")
    if max_tokens < 2:
        raise ValueError("max_tokens must be >= 2")
    rng = np.random.default_rng(seed)
    cases: list[Case] = []
    grid = token_grid(max_tokens)
    for shape in shapes:
        own = [Case(shape, (n,) * experts, f"uniform-{n}") for n in grid]
        for n in grid[1::2]:
            for kind in UNEVEN_KINDS:
                counts = uneven_counts(rng, experts, n * experts, kind)
                own.append(Case(shape, counts, f"{kind}-{n}"))
        uneven = [i for i, c in enumerate(own) if not c.label.startswith("uniform")]
        k = min(len(uneven), max(1, math.ceil(HOLDOUT_FRACTION * len(own))))
        held = set(rng.choice(uneven, size=k, replace=False).tolist())
        cases += [Case(c.shape, c.counts, c.label, i in held) for i, c in enumerate(own)]
    dtypes = list(dict.fromkeys(s.dtype for s in shapes))
    gemms = gemm_cases(gemm_shapes or [], dtypes, max_tokens)
    return Plan(cases, copy_bytes, host_copy_bytes, repeats, warmup, alltoall_bytes or [], gemms)


def set_bytes(shape: ExpertShape, experts: int, max_tokens: int, element_bytes: float) -> float:
    """Bytes of one set of a shape's expert weights (up, down) and inputs ``[E, max, hidden]``."""
    up = shape.width * (2 if shape.matrices == 3 else 1)
    return element_bytes * experts * ((up + shape.width + max_tokens) * shape.hidden)


@dataclass(frozen=True)
class PlanCost:
    """What a plan will take: a rough wall time and the least memory it needs at once.

    Attributes:
        seconds: Expert calls (warm-up, timed repeats and the check) at ``flops_per_s``.
        peak_bytes: One set of the largest shape's weights and inputs, or the copy buffers.
    """

    seconds: float
    peak_bytes: float

    def describe(self) -> str:
        """One line for the user."""
        from moesim.estimate import duration

        memory = self.peak_bytes / 2**30
        return f"roughly {duration(self.seconds)}, at least {memory:.1f} GiB of memory"


def plan_cost(plan: Plan, flops_per_s: float, element_bytes: dict[str, float]) -> PlanCost:
    """The cost of ``plan`` on a device computing ``flops_per_s``, storing each dtype in
    ``element_bytes[dtype]`` bytes."""
    calls = plan.warmup + plan.repeats + 1
    flops = sum(calls * c.shape.flops(sum(c.counts)) for c in plan.cases)
    flops += sum(calls * g.flops for g in plan.gemms)
    peak = 2.0 * plan.copy_bytes
    for g in plan.gemms:
        peak = max(peak, (g.n * g.k + g.m * (g.k + g.n)) * element_bytes[g.dtype])
    for shape in plan.shapes():
        cases = [c for c in plan.cases if c.shape == shape]
        most = max(max(c.counts) for c in cases)
        peak = max(peak, set_bytes(shape, len(cases[0].counts), most, element_bytes[shape.dtype]))
    return PlanCost(flops / flops_per_s, peak)
