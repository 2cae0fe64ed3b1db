"""What every measurement backend shares: the raw document, case records, rotating buffer sets,
the reference FFN and its check, the timing loop.

The raw document (:func:`new_document`) holds, for every case, the median of ``repeats`` timed
calls after ``warmup`` untimed ones, each call on the next of several rotating input and weight
sets (so the caches do not flatter small shapes), after the output was checked against a
float64 reference. Inputs are random, never zeros. Parts a backend cannot measure are recorded
as ``{"skipped": reason}``, never guessed.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from moesim.calibration.plan import Case, ExpertShape, GemmCase, Plan
from moesim.errors import CalibrationError

FORMAT = "moesim-calibration/1"
CACHE_BYTES = 64 << 20  # rotate enough buffer sets to exceed this (L2 / last-level cache)
MAX_SETS = 8
# ||out - ref|| / ||ref|| allowed per dtype (the intermediate is rounded to the dtype too).
CHECK_TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 2e-2, "fp8": 8e-2}

Progress = Callable[[str], None]


class Backend(Protocol):
    """Measures a plan; ``name`` is the ``--backend`` value."""

    name: str

    def measure(self, plan: Plan, progress: Progress | None = None) -> dict[str, Any]: ...


def new_document(backend: str, device: str, detail: dict[str, Any], plan: Plan) -> dict[str, Any]:
    """The raw measurement file's skeleton (filled by the backend)."""
    return {
        "format": FORMAT,
        "backend": backend,
        "device": device,
        "device_detail": detail,
        "host": platform.node(),
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {k: v for k, v in plan.as_json().items() if k not in ("cases", "gemms")},
        "expert_ffn": [],
        "gemm": [],
    }


def case_record(case: Case, samples: list[float], check: float) -> dict[str, Any]:
    """One measured case: its plan entry, the median and every sample, the check's error."""
    tol = CHECK_TOL[case.shape.dtype]
    if not np.isfinite(check) or check > tol:
        raise CalibrationError(
            f"{case.shape.key} {case.label}: output differs from the float64 reference by "
            f"{check:.3g} (allowed {tol:g}); refusing to time a wrong result"
        )
    return {
        **case.as_json(),
        "seconds": statistics.median(samples),
        "samples": samples,
        "check_rel_error": check,
    }


def gemm_record(case: GemmCase, samples: list[float], check: float) -> dict[str, Any]:
    """The raw record of one GEMM: its shape, every timed sample, the median, the check."""
    if not np.isfinite(check) or check > CHECK_TOL[case.dtype]:
        raise CalibrationError(
            f"GEMM {case.m}x{case.n}x{case.k} {case.dtype}: result differs from the float64 "
            f"reference by {check:.2e} (tolerance {CHECK_TOL[case.dtype]:g})"
        )
    seconds = statistics.median(samples)
    return {**case.as_json(), "seconds": seconds, "samples": samples, "check_rel_error": check}


def buffer_sets(nbytes: float) -> int:
    """How many rotating sets make the working set larger than the caches."""
    return int(min(MAX_SETS, max(2, np.ceil(2 * CACHE_BYTES / max(nbytes, 1.0)))))


def fit_in_memory(sets: int, nbytes: float, shape: ExpertShape) -> int:
    """Fewer rotating sets where host memory is short; an error where not even one fits."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return sets
    if nbytes > avail / 2:
        raise CalibrationError(
            f"{shape.key}: one set of weights and inputs takes {nbytes / 2**30:.1f} GiB, more "
            f"than half of the {avail / 2**30:.1f} GiB of free memory; lower --experts or "
            "--max-tokens"
        )
    return max(1, min(sets, int(avail / 2 // nbytes)))


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref)) / max(float(np.linalg.norm(ref)), 1e-30)


def activation(shape: ExpertShape, h: Any, xp: Any) -> Any:
    """SwiGLU (``silu(gate) * up``) for gated experts, ReLU otherwise; ``xp`` is numpy or torch."""
    if shape.matrices == 3:
        gate, up = h[:, : shape.width], h[:, shape.width :]
        return gate / (1 + xp.exp(-gate)) * up
    return xp.maximum(h, 0) if xp is np else h.clamp_min(0)


def reference_ffn(shape: ExpertShape, x: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """Float64 expert FFN: ``act(x @ w1.T) @ w2.T`` (weights stored ``[out, in]``)."""
    x64, w164, w264 = (a.astype(np.float64) for a in (x, w1, w2))
    return activation(shape, x64 @ w164.T, np) @ w264.T


def timed(fn: Callable[[int], Any], plan: Plan, sets: int) -> list[float]:
    """Host-clock samples of ``fn(set_index)`` after ``plan.warmup`` untimed calls."""
    for i in range(plan.warmup):
        fn(i % sets)
    out = []
    for i in range(plan.repeats):
        t0 = time.perf_counter()
        fn(i % sets)
        out.append(time.perf_counter() - t0)
    return out


def rand(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)


def weights(rng: np.random.Generator, shape: ExpertShape, experts: int) -> list[np.ndarray]:
    """One set of expert weights ``[E, out, in]`` for the up and down projections."""
    up = shape.width * (2 if shape.matrices == 3 else 1)
    return [
        rand(rng, (experts, up, shape.hidden), shape.hidden**-0.5),
        rand(rng, (experts, shape.hidden, shape.width), shape.width**-0.5),
    ]


def call_overhead(calls: int = 2000, repeats: int = 7) -> Iterator[float]:
    a = np.ones(1, dtype=np.float32)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            np.multiply(a, 1.0, out=a)
        yield (time.perf_counter() - t0) / calls


def cpu_name() -> str:
    """The CPU's model name, for the raw document."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())
