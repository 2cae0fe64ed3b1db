"""Measurement backends: ``cpu`` (NumPy), ``torch`` (PyTorch, on CUDA when present) and ``cuda``
(the bundled CUDA C++ microbenchmark, :mod:`moesim.calibration.cuda`).

Each backend measures a :class:`~moesim.calibration.plan.Plan` and returns the raw measurement
document (:func:`new_document`): for every case the median of ``repeats`` timed calls after
``warmup`` untimed ones, each call on the next of several rotating input and weight sets (so the
caches do not flatter small shapes), after the output was checked against a float64 reference.
Inputs are random, never zeros. Parts a backend cannot measure are recorded as
``{"skipped": reason}``, never guessed.
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

from moesim.calibration.plan import Case, ExpertShape, Plan, set_bytes
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
        "settings": {k: v for k, v in plan.as_json().items() if k != "cases"},
        "expert_ffn": [],
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


def _rand(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(np.float32)


def weights(rng: np.random.Generator, shape: ExpertShape, experts: int) -> list[np.ndarray]:
    """One set of expert weights ``[E, out, in]`` for the up and down projections."""
    up = shape.width * (2 if shape.matrices == 3 else 1)
    return [
        _rand(rng, (experts, up, shape.hidden), shape.hidden**-0.5),
        _rand(rng, (experts, shape.hidden, shape.width), shape.width**-0.5),
    ]


class CPUBackend:
    """The whole pipeline on the CPU with NumPy (float32), so it runs where there is no GPU.

    "HBM" bandwidth is host DRAM bandwidth (a large array copy, bytes read plus written) and the
    launch overhead is the cost of one minimal NumPy call; there is no device-host link.
    """

    name = "cpu"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def measure(self, plan: Plan, progress: Progress | None = None) -> dict[str, Any]:
        bad = sorted({s.dtype for s in plan.shapes()} - {"fp32"})
        if bad:
            raise CalibrationError(
                f"the cpu backend measures fp32 only (NumPy has no {', '.join(bad)} matmul); "
                "use --dtype fp32, or --backend torch"
            )
        doc = new_document("cpu", _cpu_name(), {"machine": platform.machine()}, plan)
        for shape in plan.shapes():
            cases = [c for c in plan.cases if c.shape == shape]
            experts = len(cases[0].counts)
            max_tokens = max(max(c.counts) for c in cases)
            nbytes = set_bytes(shape, experts, max_tokens, 4.0)
            sets = fit_in_memory(buffer_sets(nbytes), nbytes, shape)
            wsets = [weights(self.rng, shape, experts) for _ in range(sets)]
            xsets = [_rand(self.rng, (experts, max_tokens, shape.hidden), 1.0) for _ in range(sets)]
            for case in cases:
                if progress:
                    progress(f"{shape.key} {case.label}")
                doc["expert_ffn"].append(self._case(case, wsets, xsets, plan))
        doc["memory"] = self._memory(plan)
        doc["launch"] = {"seconds": statistics.median(_call_overhead())}
        doc["host_link"] = {"skipped": "the cpu backend has no device-host link"}
        doc["peer"] = {"skipped": "the cpu backend has one device"}
        doc["alltoall"] = {"skipped": "the cpu backend has one device"}
        return doc

    def _case(
        self, case: Case, wsets: list[list[np.ndarray]], xsets: list[np.ndarray], plan: Plan
    ) -> dict[str, Any]:
        shape = case.shape

        def call(s: int) -> list[np.ndarray]:
            w1, w2 = wsets[s]
            x = xsets[s]
            return [
                activation(shape, x[e, :n] @ w1[e].T, np) @ w2[e].T
                for e, n in enumerate(case.counts)
                if n > 0
            ]

        out = call(0)
        busy = [e for e, n in enumerate(case.counts) if n > 0]
        e0, n0 = busy[0], min(case.counts[busy[0]], 64)
        ref = reference_ffn(shape, xsets[0][e0, :n0], wsets[0][0][e0], wsets[0][1][e0])
        check = rel_error(out[0][:n0], ref)
        return case_record(case, timed(call, plan, len(wsets)), check)

    def _memory(self, plan: Plan) -> dict[str, Any]:
        n = plan.copy_bytes // 4
        src = self.rng.standard_normal(n, dtype=np.float32)
        dst = np.empty_like(src)
        np.copyto(dst, src)
        if not np.array_equal(dst[:: max(1, n // 1024)], src[:: max(1, n // 1024)]):
            raise CalibrationError("memory copy check failed")
        samples = timed(lambda _s: np.copyto(dst, src), plan, 1)
        sec = statistics.median(samples)
        moved = 2 * 4 * n
        return {"bytes": moved, "seconds": sec, "gb_per_s": moved / sec / 1e9, "samples": samples}


def _call_overhead(calls: int = 2000, repeats: int = 7) -> Iterator[float]:
    a = np.ones(1, dtype=np.float32)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            np.multiply(a, 1.0, out=a)
        yield (time.perf_counter() - t0) / calls


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


BACKENDS = ("cpu", "torch", "cuda")


def get_backend(name: str, seed: int = 0) -> Backend:
    """The backend called ``name`` (``cpu``, ``torch`` or ``cuda``)."""
    if name == "cpu":
        return CPUBackend(seed)
    if name == "torch":
        from moesim.calibration.torch_backend import TorchBackend

        return TorchBackend(seed)
    if name == "cuda":
        from moesim.calibration.cuda import CudaBackend

        return CudaBackend(seed)
    raise CalibrationError(f"unknown backend '{name}'; valid: {', '.join(BACKENDS)}")


def default_dtypes(name: str) -> list[str]:
    """What a backend measures unless told: bf16, plus fp8 where the GPU has it (compute
    capability 8.9 and newer); fp32 on the CPU (NumPy's and PyTorch's fast CPU path)."""
    if name == "cpu":
        return ["fp32"]
    if name == "torch":
        from moesim.calibration.torch_backend import torch_capability

        cap = torch_capability()
    else:
        from moesim.calibration.cuda import gpu_capability

        cap = gpu_capability()
    if cap is None:
        return ["fp32"]
    return ["bf16", "fp8"] if cap >= (8, 9) else ["bf16"]
