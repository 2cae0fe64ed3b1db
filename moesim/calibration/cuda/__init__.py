"""The ``cuda`` backend: build the bundled microbenchmark (``moebench.cu``) with nvcc on first use
and run it.

The binary is cached per GPU architecture and per source, nvcc and cuBLAS version under
``$MOESIM_CACHE`` (default ``~/.cache/moesim``)``/cuda/<sm_XY>-<hash>/moebench``. cuBLAS headers
and libraries are looked for in ``$MOESIM_CUBLAS_HOME``, ``$CUDA_HOME``, ``/usr/local/cuda``
and the ``nvidia-cublas`` wheel (``pip install 'moesim[cuda]'``), in that order. With two or
more GPUs the NCCL all-to-all is measured through ``torch.distributed`` when PyTorch is present.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesim.calibration.measure import Progress, case_record, gemm_record, new_document
from moesim.calibration.plan import Plan
from moesim.errors import CalibrationError

SOURCE = Path(__file__).with_name("moebench.cu")
DTYPES = ("bf16", "fp8")


@dataclass(frozen=True)
class Toolchain:
    """nvcc and the cuBLAS headers and library it builds against."""

    nvcc: Path
    include: Path
    lib: Path
    cublaslt: Path

    def version_key(self) -> str:
        out = subprocess.run(
            [str(self.nvcc), "--version"], capture_output=True, text=True, check=False
        )
        return out.stdout.strip().splitlines()[-1] if out.stdout else "?"


def _cublas_roots() -> list[Path]:
    roots = [os.environ.get(k) for k in ("MOESIM_CUBLAS_HOME", "CUDA_HOME", "CUDA_PATH")]
    found = [Path(r) for r in roots if r]
    found.append(Path("/usr/local/cuda"))
    try:
        import nvidia  # the nvidia-* wheels' namespace package

        for base in getattr(nvidia, "__path__", []):
            found += [*sorted(Path(base).glob("cu*")), Path(base) / "cublas"]
    except ImportError:
        pass
    return found


def find_toolchain() -> Toolchain:
    """nvcc on ``PATH`` (or ``$CUDA_HOME/bin``) and the first root holding ``cublasLt.h`` and
    ``libcublasLt.so*``."""
    nvcc = shutil.which("nvcc") or next(
        (str(r / "bin" / "nvcc") for r in _cublas_roots() if (r / "bin" / "nvcc").is_file()), None
    )
    if nvcc is None:
        raise CalibrationError(
            "the cuda backend needs nvcc (the CUDA toolkit) on PATH or in $CUDA_HOME/bin"
        )
    for root in _cublas_roots():
        inc = root / "include"
        libs = [
            p
            for d in ("lib64", "lib")
            for p in sorted((root / d).glob("libcublasLt.so*"))
            if (root / d).is_dir()
        ]
        if (inc / "cublasLt.h").is_file() and libs:
            return Toolchain(Path(nvcc), inc, libs[0].parent, libs[0])
    raise CalibrationError(
        "cuBLAS headers and libraries (cublasLt.h, libcublasLt.so) not found in "
        "$MOESIM_CUBLAS_HOME, $CUDA_HOME, /usr/local/cuda or the nvidia-cublas wheel; "
        "install them with: pip install 'moesim[cuda]'"
    )


def gpu_capability() -> tuple[int, int] | None:
    """Compute capability of GPU 0 from ``nvidia-smi``, or None where there is no GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    out = subprocess.run(
        [smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0 or not out.stdout.strip():
        return None
    major, minor = out.stdout.strip().splitlines()[0].split(".")
    return int(major), int(minor)


def cache_dir() -> Path:
    return Path(os.environ.get("MOESIM_CACHE", Path.home() / ".cache" / "moesim")) / "cuda"


def build(arch: str, out_dir: Path | None = None, tools: Toolchain | None = None) -> Path:
    """Compile ``moebench.cu`` for ``arch`` (e.g. ``sm_90``) and return the binary; a cached
    build of the same source, arch and toolchain is reused."""
    tools = tools or find_toolchain()
    key = hashlib.sha256(
        SOURCE.read_bytes() + arch.encode() + tools.version_key().encode() + bytes(tools.cublaslt)
    ).hexdigest()[:16]
    folder = out_dir or cache_dir() / f"{arch}-{key}"
    binary = folder / "moebench"
    if binary.is_file():
        return binary
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".moebench.{os.getpid()}"
    cmd = [
        str(tools.nvcc),
        "-O3",
        "-std=c++17",
        f"-arch={arch}",
        f"-I{tools.include}",
        str(SOURCE),
        f"-L{tools.lib}",
        f"-l:{tools.cublaslt.name}",
        f"-Xlinker=-rpath,{tools.lib}",
        "-o",
        str(tmp),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CalibrationError(f"nvcc failed ({' '.join(cmd)}):\n{out.stderr.strip()}")
    os.replace(tmp, binary)
    return binary


def plan_text(plan: Plan) -> str:
    """The plan in moebench's line format (see the header of ``moebench.cu``)."""
    lines = [
        f"repeats {plan.repeats}",
        f"warmup {plan.warmup}",
        f"copy_bytes {plan.copy_bytes}",
        f"host_copy_bytes {plan.host_copy_bytes}",
    ]
    for i, c in enumerate(plan.cases):
        s = c.shape
        lines.append(
            f"case {i} {s.hidden} {s.width} {s.matrices} {s.dtype} {len(c.counts)} "
            + " ".join(str(n) for n in c.counts)
        )
    lines += [f"gemm {i} {g.m} {g.n} {g.k} {g.dtype}" for i, g in enumerate(plan.gemms)]
    return "\n".join([*lines, "run"]) + "\n"


def parse_output(lines: list[str], plan: Plan, progress: Progress | None = None) -> dict[str, Any]:
    """Build the raw measurement document from moebench's JSON lines."""
    records = [json.loads(line) for line in lines if line.strip()]
    head = records[0]
    doc = new_document("cuda", head["device"], head, plan)
    for rec in records[1:]:
        if "case" in rec or "gemm" in rec:  # an expert FFN case, or a dense GEMM
            if "case" in rec:
                case = plan.cases[rec["case"]]
                label, key, impl = f"{case.shape.key} {case.label}", "expert_ffn", "cublasLt loop"
                out = case_record(case, rec["samples"], rec["check_rel_error"])
            else:
                g = plan.gemms[rec["gemm"]]
                label, key, impl = f"gemm {g.m}x{g.n}x{g.k} {g.dtype}", "gemm", "cublasLt"
                out = gemm_record(g, rec["samples"], rec["check_rel_error"])
            if progress:
                progress(label)
            doc[key].append({**out, "impl": impl, "buffer_sets": rec["sets"]})
        elif "memory" in rec:
            m = rec["memory"]
            sec = statistics.median(m["samples"])
            doc["memory"] = {**m, "seconds": sec, "gb_per_s": m["bytes"] / sec / 1e9}
        elif "host_link" in rec:
            h = rec["host_link"]
            n = h["bytes"]
            doc["host_link"] = {
                **h,
                "h2d_gb_per_s": n / statistics.median(h["h2d_samples"]) / 1e9,
                "d2h_gb_per_s": n / statistics.median(h["d2h_samples"]) / 1e9,
                "h2d_during_gemm_gb_per_s": n
                / statistics.median(h["h2d_during_gemm_samples"])
                / 1e9,
            }
        elif "launch" in rec:
            doc["launch"] = {
                **rec["launch"],
                "seconds": statistics.median(rec["launch"]["samples"]),
            }
        elif "peer" in rec:
            p = rec["peer"]
            if "samples" in p:
                p = {**p, "gb_per_s": p["bytes"] / statistics.median(p["samples"]) / 1e9}
            doc["peer"] = p
    missing = [k for k in ("memory", "host_link", "launch", "peer") if k not in doc]
    if missing or len(doc["expert_ffn"]) != len(plan.cases) or len(doc["gemm"]) != len(plan.gemms):
        raise CalibrationError(
            f"moebench output incomplete: {len(doc['expert_ffn'])} of {len(plan.cases)} cases, "
            f"{len(doc['gemm'])} of {len(plan.gemms)} GEMMs, "
            f"missing {', '.join(missing) or 'nothing else'}"
        )
    return doc


class CudaBackend:
    """Builds and runs moebench on GPU 0."""

    name = "cuda"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def measure(self, plan: Plan, progress: Progress | None = None) -> dict[str, Any]:
        bad = sorted({s.dtype for s in plan.shapes()} - set(DTYPES))
        if bad:
            raise CalibrationError(f"the cuda backend measures {', '.join(DTYPES)}, not {bad}")
        cap = gpu_capability()
        if cap is None:
            raise CalibrationError(
                "no NVIDIA GPU found (nvidia-smi); use --backend cpu to run the pipeline here"
            )
        if "fp8" in {s.dtype for s in plan.shapes()} and cap < (8, 9):
            raise CalibrationError(f"fp8 needs compute capability 8.9+, this GPU has {cap}")
        binary = build(f"sm_{cap[0]}{cap[1]}")
        proc = subprocess.Popen(
            [str(binary)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(plan_text(plan))
        proc.stdin.close()
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if progress and '"case"' in line:
                progress("case")
        err = proc.stderr.read() if proc.stderr else ""
        if proc.wait() != 0:
            raise CalibrationError(f"moebench failed (exit {proc.returncode}): {err.strip()}")
        doc = parse_output(lines, plan)
        doc["alltoall"] = _alltoall(plan)
        return doc


def _alltoall(plan: Plan) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"skipped": "PyTorch is not installed (NCCL all-to-all runs through it)"}
    count = torch.cuda.device_count()
    if count < 2:
        return {"skipped": f"{count} CUDA device(s); all-to-all needs two or more"}
    from moesim.calibration.torch_backend import A2A_SIZES, measure_alltoall

    return measure_alltoall(count, plan.alltoall_bytes or A2A_SIZES, plan.repeats)
