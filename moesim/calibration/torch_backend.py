"""The ``torch`` backend: the calibration measurements with PyTorch, on CUDA when present.

Expert FFNs run as ``torch._grouped_mm`` over all experts (bf16 on CUDA, where PyTorch has it)
or as a loop of ``torch.matmul`` per expert (``torch._scaled_mm`` for fp8, rows padded to 16
as fp8 GEMMs require). CUDA timings use CUDA events; CPU timings the host clock. With two or
more GPUs it also measures peer copies and an NCCL all-to-all through ``torch.distributed``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from moesim.calibration.measure import (
    Progress,
    activation,
    buffer_sets,
    case_record,
    gemm_record,
    new_document,
    rel_error,
    timed,
)
from moesim.calibration.plan import Case, ExpertShape, GemmCase, Plan
from moesim.errors import CalibrationError

FP8_ROWS = 16


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise CalibrationError(
            "the torch backend needs PyTorch (pip install 'moesim[trace]')"
        ) from e
    return torch


def torch_capability() -> tuple[int, int] | None:
    """Compute capability of CUDA device 0 as PyTorch sees it, or None without CUDA."""
    torch = _torch()
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return int(major), int(minor)


class TorchBackend:
    """Measures a plan with PyTorch (see the module docstring)."""

    name = "torch"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def measure(self, plan: Plan, progress: Progress | None = None) -> dict[str, Any]:
        torch = _torch()
        cuda = torch.cuda.is_available()
        self.dev = torch.device("cuda:0" if cuda else "cpu")
        self.gen = torch.Generator(device=self.dev).manual_seed(self.seed)
        if cuda:
            props = torch.cuda.get_device_properties(0)
            name = props.name
            detail = {
                "torch": torch.__version__,
                "capability": list(torch.cuda.get_device_capability(0)),
                "sm_count": props.multi_processor_count,
                "memory_bytes": props.total_memory,
                "cuda": torch.version.cuda,
            }
        else:
            from moesim.calibration.measure import cpu_name

            name, detail = (
                cpu_name(),
                {"torch": torch.__version__, "threads": torch.get_num_threads()},
            )
        doc = new_document("torch", name, detail, plan)
        for shape in plan.shapes():
            self._check_dtype(shape.dtype)
            cases = [c for c in plan.cases if c.shape == shape]
            doc["expert_ffn"] += self._shape(shape, cases, plan, progress)
        for g in plan.gemms:
            if progress:
                progress(f"gemm {g.m}x{g.n}x{g.k} {g.dtype}")
            doc["gemm"].append(self._gemm(g, plan))
        doc["memory"] = self._memory(plan)
        doc["launch"] = {"seconds": self._launch()}
        doc["host_link"] = self._host_link(plan) if cuda else {"skipped": "no CUDA device"}
        count = torch.cuda.device_count() if cuda else 0
        if count >= 2:
            doc["peer"] = self._peer(plan)
            doc["alltoall"] = measure_alltoall(
                count, plan.alltoall_bytes or A2A_SIZES, plan.repeats
            )
        else:
            why = f"{count} CUDA device(s); peer and all-to-all need two or more"
            doc["peer"] = {"skipped": why}
            doc["alltoall"] = {"skipped": why}
        return doc

    # -- expert FFN ---------------------------------------------------------------------------

    def _check_dtype(self, dtype: str) -> None:
        torch = _torch()
        if dtype == "fp8":
            cap = torch_capability()
            if cap is None or cap < (8, 9) or not hasattr(torch, "_scaled_mm"):
                raise CalibrationError(
                    "fp8 needs a CUDA GPU of compute capability 8.9 or newer and "
                    "torch._scaled_mm; measure bf16 here (--dtype bf16)"
                )

    def _dtype(self, dtype: str) -> Any:
        torch = _torch()
        return {
            "fp32": torch.float32,
            "bf16": torch.bfloat16,
            "fp16": torch.float16,
            "fp8": torch.float8_e4m3fn,
        }[dtype]

    def _randn(self, *shape: int) -> Any:
        return _torch().randn(*shape, generator=self.gen, device=self.dev, dtype=_torch().float32)

    def _shape(
        self, shape: ExpertShape, cases: list[Case], plan: Plan, progress: Progress | None
    ) -> list[dict[str, Any]]:
        torch = _torch()
        e = len(cases[0].counts)
        top = max(max(c.counts) for c in cases)
        rows = -(-top // FP8_ROWS) * FP8_ROWS
        up = shape.width * (2 if shape.matrices == 3 else 1)
        dt = self._dtype(shape.dtype)
        wbytes = e * (up + shape.width) * shape.hidden * (1 if shape.dtype == "fp8" else 2)
        sets = buffer_sets(wbytes)
        # fp8 weights hold N(0, 1) values with a per-tensor scale, as fp8 GEMMs are used.
        s1, s2 = shape.hidden**-0.5, shape.width**-0.5
        fp8 = shape.dtype == "fp8"
        bufs = []
        for _ in range(sets):
            w1 = self._randn(e, up, shape.hidden) * (1.0 if fp8 else s1)
            w2 = self._randn(e, shape.hidden, shape.width) * (1.0 if fp8 else s2)
            x = self._randn(e * rows, shape.hidden)
            bufs.append((w1.to(dt), w2.to(dt), x.to(dt)))
        out: list[dict[str, Any]] = []
        grouped = self._grouped_ok(shape)
        for case in cases:
            if progress:
                progress(f"{shape.key} {case.label}")
            fn = self._ffn(shape, case, rows, grouped, (s1, s2) if fp8 else (1.0, 1.0))

            def call(s: int, fn: Callable[..., Any] = fn) -> Any:
                return fn(*bufs[s])

            got = call(0)
            check = self._check(shape, case, rows, bufs[0], got, (s1, s2) if fp8 else (1.0, 1.0))
            rec = case_record(case, self._time(call, plan, sets), check)
            rec["impl"] = "torch._grouped_mm" if grouped else "loop"
            out.append(rec)
            del got
        if self.dev.type == "cuda":
            torch.cuda.empty_cache()
        return out

    def _gemm(self, g: GemmCase, plan: Plan) -> dict[str, Any]:
        """``x [m, k] @ w^T`` (``w [n, k]``) in the dtype: ``torch.mm``, or ``torch._scaled_mm``
        with per-tensor scales and BF16 output for fp8 (rows padded to 16), as FP8 GEMMs run."""
        torch = _torch()
        dt, fp8 = self._dtype(g.dtype), g.dtype == "fp8"
        rows = -(-g.m // FP8_ROWS) * FP8_ROWS if fp8 else g.m
        scale = g.k**-0.5
        sets = buffer_sets(g.n * g.k * (1 if fp8 else 2) + rows * g.k)
        bufs = [
            (
                (self._randn(g.n, g.k) * (1.0 if fp8 else scale)).to(dt),
                self._randn(rows, g.k).to(dt),
            )
            for _ in range(sets)
        ]
        if fp8:
            one, sw = torch.ones((), device=self.dev), torch.tensor(scale, device=self.dev)

            def call(s: int) -> Any:
                w, x = bufs[s]
                return torch._scaled_mm(x, w.t(), one, sw, out_dtype=torch.bfloat16)

        else:

            def call(s: int) -> Any:
                w, x = bufs[s]
                return torch.mm(x, w.t())

        n = min(g.m, 64)
        w, x = bufs[0]
        w64 = w.to(torch.float64).cpu().numpy() * (scale if fp8 else 1.0)
        ref = x[:n].to(torch.float64).cpu().numpy() @ w64.T
        check = rel_error(call(0)[:n].to(torch.float64).cpu().numpy(), ref)
        rec = gemm_record(g, self._time(call, plan, sets), check)
        rec["impl"] = "torch._scaled_mm" if fp8 else "torch.mm"
        return rec

    def _grouped_ok(self, shape: ExpertShape) -> bool:
        """bf16 runs as ``torch._grouped_mm`` where PyTorch has it: on CUDA by default;
        ``MOESIM_TORCH_GROUPED=0`` times the per-expert loop instead, ``=1`` uses the grouped
        call on the CPU too (PyTorch has a CPU version, so the path is tested without a GPU)."""
        torch = _torch()
        mode = os.environ.get("MOESIM_TORCH_GROUPED", "auto")
        if mode not in ("auto", "0", "1"):
            raise CalibrationError(f"MOESIM_TORCH_GROUPED must be auto, 0 or 1, not '{mode}'")
        wanted = mode == "1" or (mode == "auto" and self.dev.type == "cuda")
        return wanted and shape.dtype == "bf16" and hasattr(torch, "_grouped_mm")

    def _ffn(
        self, shape: ExpertShape, case: Case, rows: int, grouped: bool, scales: tuple[float, float]
    ) -> Callable[..., Any]:
        """The timed call over ``(w1, w2, x)``: one grouped FFN on ``case.counts`` tokens."""
        torch = _torch()
        counts = list(case.counts)
        busy = [(i, n) for i, n in enumerate(counts) if n > 0]
        if grouped:
            offs = torch.tensor(np.cumsum(counts), dtype=torch.int32, device=self.dev)
            total = sum(counts)

            def grouped_call(w1: Any, w2: Any, x: Any) -> Any:
                h = torch._grouped_mm(x[:total], w1.transpose(-2, -1), offs=offs)
                a = activation(shape, h, torch)
                return torch._grouped_mm(a, w2.transpose(-2, -1), offs=offs)

            return grouped_call
        if shape.dtype == "fp8":
            one = torch.ones((), device=self.dev)
            sa, sb = (torch.tensor(s, device=self.dev) for s in scales)

            def fp8_call(w1: Any, w2: Any, x: Any) -> Any:
                outs = []
                for i, n in busy:
                    m = -(-n // FP8_ROWS) * FP8_ROWS
                    xi = x[i * rows : i * rows + m]
                    h = torch._scaled_mm(xi, w1[i].t(), one, sa, out_dtype=torch.bfloat16)
                    a = activation(shape, h.float(), torch).to(torch.float8_e4m3fn)
                    outs.append(torch._scaled_mm(a, w2[i].t(), one, sb, out_dtype=torch.bfloat16))
                return outs

            return fp8_call

        def loop_call(w1: Any, w2: Any, x: Any) -> Any:
            return [
                activation(shape, x[i * rows : i * rows + n] @ w1[i].t(), torch) @ w2[i].t()
                for i, n in busy
            ]

        return loop_call

    def _check(
        self,
        shape: ExpertShape,
        case: Case,
        rows: int,
        buf: tuple[Any, Any, Any],
        got: Any,
        scales: tuple[float, float],
    ) -> float:
        """Relative error of the first busy expert's first rows against float64."""
        torch = _torch()
        w1, w2, x = buf
        i = next(k for k, n in enumerate(case.counts) if n > 0)
        n = min(case.counts[i], 64)
        if isinstance(got, torch.Tensor):  # grouped: experts' rows packed one after another
            start = sum(case.counts[:i])
            out, xs = got[start : start + n], x[start : start + n]
        else:  # loop: one output per busy expert; expert i's inputs start at row i * rows
            out, xs = got[0][:n], x[i * rows : i * rows + n]
        x64 = xs.to(torch.float64).cpu().numpy()
        w164 = w1[i].to(torch.float64).cpu().numpy() * scales[0]
        w264 = w2[i].to(torch.float64).cpu().numpy() * scales[1]
        h = x64 @ w164.T
        a = activation(shape, h, np)
        if shape.dtype != "fp32":  # the fast path keeps the intermediate in the dtype
            dt = self._dtype(shape.dtype)
            a = torch.from_numpy(a).to(dt).to(torch.float64).numpy()
        ref = a @ w264.T
        return rel_error(out.to(torch.float64).cpu().numpy(), ref)

    def _time(self, call: Callable[[int], Any], plan: Plan, sets: int) -> list[float]:
        torch = _torch()
        if self.dev.type != "cuda":
            return timed(call, plan, sets)
        for i in range(plan.warmup):
            call(i % sets)
        torch.cuda.synchronize()
        events = []
        for i in range(plan.repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            call(i % sets)
            b.record()
            events.append((a, b))
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in events]

    # -- memory, host link, launch, peers -----------------------------------------------------

    def _memory(self, plan: Plan) -> dict[str, Any]:
        torch = _torch()
        n = plan.copy_bytes // 4
        src = self._randn(n)
        dst = torch.empty_like(src)
        dst.copy_(src)
        if not torch.equal(dst[:: max(1, n // 4096)], src[:: max(1, n // 4096)]):
            raise CalibrationError("memory copy check failed")
        samples = self._time(lambda _s: dst.copy_(src), plan, 1)
        sec = statistics.median(samples)
        moved = 2 * 4 * n
        return {"bytes": moved, "seconds": sec, "gb_per_s": moved / sec / 1e9, "samples": samples}

    def _launch(self, launches: int = 1000) -> float:
        torch = _torch()
        t = torch.zeros(1, device=self.dev)
        samples = []
        for _ in range(7):
            if self.dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                a.record()
                for _ in range(launches):
                    t.add_(1.0)
                b.record()
                torch.cuda.synchronize()
                samples.append(a.elapsed_time(b) / 1e3 / launches)
            else:
                t0 = time.perf_counter()
                for _ in range(launches):
                    t.add_(1.0)
                samples.append((time.perf_counter() - t0) / launches)
        return statistics.median(samples)

    def _host_link(self, plan: Plan) -> dict[str, Any]:
        torch = _torch()
        n = plan.host_copy_bytes
        host = torch.randint(0, 255, (n,), dtype=torch.uint8, generator=None).pin_memory()
        dev = torch.empty(n, dtype=torch.uint8, device=self.dev)
        dev.copy_(host)
        if not torch.equal(dev[:4096].cpu(), host[:4096]):
            raise CalibrationError("host-to-device copy check failed")
        h2d = statistics.median(self._time(lambda _s: dev.copy_(host, non_blocking=True), plan, 1))
        d2h = statistics.median(self._time(lambda _s: host.copy_(dev, non_blocking=True), plan, 1))
        # H2D while a GEMM runs on another stream: the offload path's contention.
        a = self._randn(8192, 8192).to(torch.bfloat16)
        side, copy = torch.cuda.Stream(), torch.cuda.Stream()
        during = []
        for _ in range(plan.repeats):
            torch.cuda.synchronize()
            with torch.cuda.stream(side):
                for _ in range(8):
                    a @ a
            with torch.cuda.stream(copy):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                dev.copy_(host, non_blocking=True)
                e.record()
            torch.cuda.synchronize()
            during.append(s.elapsed_time(e) / 1e3)
        return {
            "bytes": n,
            "h2d_gb_per_s": n / h2d / 1e9,
            "d2h_gb_per_s": n / d2h / 1e9,
            "h2d_during_gemm_gb_per_s": n / statistics.median(during) / 1e9,
        }

    def _peer(self, plan: Plan) -> dict[str, Any]:
        torch = _torch()
        n = plan.copy_bytes // 4
        src = self._randn(n)
        dst = torch.empty(n, device="cuda:1")
        dst.copy_(src)
        torch.cuda.synchronize()
        samples = []
        for _ in range(plan.repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            torch.cuda.synchronize()
            samples.append(time.perf_counter() - t0)
        sec = statistics.median(samples)
        return {"bytes": 4 * n, "gb_per_s": 4 * n / sec / 1e9, "pair": [0, 1]}


A2A_SIZES = [1 << 16, 1 << 20, 1 << 24, 1 << 27]


def _a2a_chunk(size: int, world: int) -> int:
    """bf16 elements one rank sends to each rank for a message of ``size`` bytes in all."""
    return max(1, size // 2 // world)


def measure_alltoall(
    world: int, sizes: list[int], repeats: int, backend: str = "nccl"
) -> dict[str, Any]:
    """All-to-all through ``torch.distributed`` on ``world`` local ranks (NCCL on GPUs; ``gloo``
    runs the same on CPU processes): per message size (bytes each rank sends in total), the
    median over ranks' medians of ``repeats`` timed calls, algbw and busbw (nccl-tests'
    relation ``busbw = algbw * (n-1)/n``). Every rank checks one call's output first."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port, so two runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(
            _a2a_worker,
            args=(world, sizes, repeats, d, backend, port),
            nprocs=world,
            join=True,
        )
        rows = np.load(os.path.join(d, "a2a.npy"))
    sent = [2 * world * _a2a_chunk(b, world) for b in sizes]
    return {
        "world": world,
        "backend": backend,
        "rows": [
            {
                "bytes": b,
                "seconds": float(t),
                "algbw_gb_per_s": b / t / 1e9,
                "busbw_gb_per_s": b / t / 1e9 * (world - 1) / world,
            }
            for b, t in zip(sent, rows, strict=True)
        ],
    }


def _a2a_worker(
    rank: int, world: int, sizes: list[int], repeats: int, folder: str, backend: str, port: int
) -> None:
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        dev = torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for size in sizes:
        chunk = _a2a_chunk(size, world)
        # chunk j goes to rank j; value = 1000 * sender + receiver + position / chunk
        pos = torch.arange(chunk, device=dev, dtype=torch.float32) / chunk
        x = torch.cat([1000 * rank + j + pos for j in range(world)]).to(torch.bfloat16)
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x)
        want = torch.cat([1000 * j + rank + pos for j in range(world)]).to(torch.bfloat16)
        if not torch.equal(y, want):
            raise CalibrationError(f"all-to-all check failed on rank {rank} at {size} bytes")
        for _ in range(2):
            dist.all_to_all_single(y, x)
        sync()
        samples = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(y, x)
            sync()
            samples.append(time.perf_counter() - t0)
        times.append(statistics.median(samples))
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(times, gathered, dst=0)
    if rank == 0:
        assert gathered is not None
        np.save(os.path.join(folder, "a2a.npy"), np.median(np.array(gathered), axis=0))
    dist.destroy_process_group()
