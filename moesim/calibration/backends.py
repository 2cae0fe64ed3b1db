"""Measurement backends: ``cpu`` (NumPy), ``torch`` (PyTorch, on CUDA when present) and ``cuda``
(the bundled CUDA C++ microbenchmark, :mod:`moesim.calibration.cuda`); what they share is in
:mod:`moesim.calibration.measure`.
"""

from __future__ import annotations

import platform
import statistics
from typing import Any

import numpy as np

from moesim.calibration.measure import (
    Backend,
    Progress,
    activation,
    buffer_sets,
    call_overhead,
    case_record,
    cpu_name,
    fit_in_memory,
    gemm_record,
    new_document,
    rand,
    reference_ffn,
    rel_error,
    timed,
    weights,
)
from moesim.calibration.plan import Case, GemmCase, Plan, set_bytes
from moesim.errors import CalibrationError


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
        doc = new_document("cpu", cpu_name(), {"machine": platform.machine()}, plan)
        for shape in plan.shapes():
            cases = [c for c in plan.cases if c.shape == shape]
            experts = len(cases[0].counts)
            max_tokens = max(max(c.counts) for c in cases)
            nbytes = set_bytes(shape, experts, max_tokens, 4.0)
            sets = fit_in_memory(buffer_sets(nbytes), nbytes, shape)
            wsets = [weights(self.rng, shape, experts) for _ in range(sets)]
            xsets = [rand(self.rng, (experts, max_tokens, shape.hidden), 1.0) for _ in range(sets)]
            for case in cases:
                if progress:
                    progress(f"{shape.key} {case.label}")
                doc["expert_ffn"].append(self._case(case, wsets, xsets, plan))
        for g in plan.gemms:
            if progress:
                progress(f"gemm {g.m}x{g.n}x{g.k} {g.dtype}")
            doc["gemm"].append(self._gemm(g, plan))
        doc["memory"] = self._memory(plan)
        doc["launch"] = {"seconds": statistics.median(call_overhead())}
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

    def _gemm(self, g: GemmCase, plan: Plan) -> dict[str, Any]:
        """``x [m, k] @ w [k, n]`` in float32 on rotating sets, checked against float64."""
        sets = buffer_sets(4.0 * (g.n * g.k + g.m * g.k))
        ws = [rand(self.rng, (g.k, g.n), g.k**-0.5) for _ in range(sets)]
        xs = [rand(self.rng, (g.m, g.k), 1.0) for _ in range(sets)]
        rows = min(g.m, 64)
        ref = xs[0][:rows].astype(np.float64) @ ws[0].astype(np.float64)
        check = rel_error((xs[0] @ ws[0])[:rows], ref)
        return gemm_record(g, timed(lambda s: xs[s] @ ws[s], plan, sets), check)

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
