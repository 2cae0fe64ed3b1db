"""The bundled CUDA microbenchmark compiles with nvcc against cuBLAS (CI has nvcc, no GPU), and
its output is read into the raw measurement document."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from moesim.calibration.cuda import build, find_toolchain, gpu_capability, parse_output, plan_text
from moesim.calibration.plan import ExpertShape, make_plan
from moesim.errors import CalibrationError

needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not on PATH"
)


@pytest.fixture(scope="module")
def moebench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("sm_90", out_dir=tmp_path_factory.mktemp("moebench"))


@needs_nvcc
def test_moebench_compiles_and_links_for_hopper(moebench: Path) -> None:
    binary = moebench
    assert binary.is_file() and binary.stat().st_size > 100_000
    assert build("sm_90", out_dir=binary.parent) == binary  # cached
    if gpu_capability() is None:
        # no GPU here: the first CUDA call's status is checked and reported, not ignored
        out = subprocess.run([str(binary)], input="run\n", capture_output=True, text=True)
        assert out.returncode == 3
        assert "moebench: cudaGetDeviceProperties" in out.stderr


@needs_nvcc
@pytest.mark.parametrize(
    "line",
    [
        "case 0 64 128 3 bf16 2 0 0",
        "case 0 64 128 3 bf16 -1",
        "case 0 64 128 3 fp16 2 1 1",
        "case 0 64 128 3 bf16 3 1 1",
        "gemm 0 0 128 64 bf16",
        "gemm 0 16 128 64 fp32",
        "gemm 0 16 128",
        "warp 9",
    ],
)
def test_moebench_rejects_a_bad_plan_before_touching_the_gpu(moebench: Path, line: str) -> None:
    out = subprocess.run([str(moebench)], input=f"{line}\nrun\n", capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.startswith("moebench: ") and line.split()[0] in out.stderr


@needs_nvcc
def test_toolchain_finds_cublas() -> None:
    tools = find_toolchain()
    assert (tools.include / "cublasLt.h").is_file()
    assert tools.cublaslt.name.startswith("libcublasLt.so")


def test_plan_text_and_output_parsing_round_trip() -> None:
    plan = make_plan([ExpertShape(64, 128, 3, "bf16")], 2, 4, repeats=3, gemm_shapes=[(96, 64)])
    text = plan_text(plan)
    assert text.splitlines()[0] == "repeats 3" and text.endswith("run\n")
    assert len([x for x in text.splitlines() if x.startswith("case ")]) == len(plan.cases)
    gemm_lines = [x for x in text.splitlines() if x.startswith("gemm ")]
    assert gemm_lines == ["gemm 0 1 96 64 bf16", "gemm 1 2 96 64 bf16", "gemm 2 4 96 64 bf16"]
    lines = [json.dumps({"device": "NVIDIA H100 80GB HBM3", "capability": [9, 0]})]
    lines += [
        json.dumps(
            {
                "case": i,
                "sets": 2,
                "check_rel_error": 3e-3,
                "samples": [1e-5 * (1 + i), 1.1e-5 * (1 + i), 0.9e-5 * (1 + i)],
            }
        )
        for i in range(len(plan.cases))
    ]
    lines += [
        json.dumps({"gemm": i, "sets": 2, "check_rel_error": 2e-3, "samples": [2e-6, 3e-6, 4e-6]})
        for i in range(len(plan.gemms))
    ]
    lines += [
        json.dumps({"memory": {"bytes": 2 << 30, "samples": [1e-3, 0.7e-3, 0.8e-3]}}),
        json.dumps(
            {
                "host_link": {
                    "bytes": 1 << 28,
                    "h2d_samples": [5e-3],
                    "d2h_samples": [5e-3],
                    "h2d_during_gemm_samples": [6e-3],
                }
            }
        ),
        json.dumps({"launch": {"samples": [2e-6, 3e-6, 2.5e-6]}}),
        json.dumps({"peer": {"skipped": "1 CUDA device(s)"}}),
    ]
    doc = parse_output(lines, plan)
    assert doc["device"] == "NVIDIA H100 80GB HBM3"
    assert doc["memory"]["gb_per_s"] == pytest.approx((2 << 30) / 0.8e-3 / 1e9)
    assert doc["launch"]["seconds"] == 2.5e-6
    assert doc["expert_ffn"][1]["seconds"] == pytest.approx(2e-5)
    assert [(g["m"], g["seconds"], g["impl"]) for g in doc["gemm"]] == [
        (1, 3e-6, "cublasLt"), (2, 3e-6, "cublasLt"), (4, 3e-6, "cublasLt")
    ]  # fmt: skip
    with pytest.raises(CalibrationError, match="2 of 3 GEMMs"):
        parse_output([x for x in lines if '"gemm": 2' not in x], plan)
    with pytest.raises(CalibrationError, match="incomplete"):
        parse_output(lines[:-2], plan)
    bad = [lines[0], json.dumps({"case": 0, "sets": 2, "check_rel_error": 0.5, "samples": [1]})]
    with pytest.raises(CalibrationError, match="refusing to time a wrong result"):
        parse_output(bad, plan)
