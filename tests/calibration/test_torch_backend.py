"""The torch backend on the CPU (CI has CPU PyTorch): the same measurements as on a GPU."""

from __future__ import annotations

import pytest

from moesim.calibration.fit import fit_cases
from moesim.calibration.plan import ExpertShape, make_plan
from moesim.errors import CalibrationError

torch = pytest.importorskip("torch", reason="PyTorch is installed by `make test` (trace extra)")


@pytest.mark.parametrize(("dtype", "tol"), [("fp32", 1e-4), ("bf16", 2e-2)])
def test_torch_backend_measures_checks_and_fits_on_cpu(dtype: str, tol: float) -> None:
    from moesim.calibration.torch_backend import TorchBackend

    shapes = [ExpertShape(128, 256, 3, dtype), ExpertShape(128, 256, 2, dtype)]
    plan = make_plan(
        shapes, 4, 16, repeats=3, warmup=1, copy_bytes=8 << 20, gemm_shapes=[(96, 128), (128, 64)]
    )
    doc = TorchBackend(seed=1).measure(plan)
    assert doc["backend"] == "torch" and doc["device"].startswith("CPU")
    # dense GEMMs at m = 1 .. 16 for each (n, k), checked against float64
    assert [(r["m"], r["n"], r["k"]) for r in doc["gemm"]][:5] == [
        (1, 96, 128), (2, 96, 128), (4, 96, 128), (8, 96, 128), (16, 96, 128)
    ]  # fmt: skip
    assert len(doc["gemm"]) == 10 and all(r["impl"] == "torch.mm" for r in doc["gemm"])
    assert all(0 < r["check_rel_error"] < tol and r["seconds"] > 0 for r in doc["gemm"])
    assert len(doc["expert_ffn"]) == len(plan.cases)
    assert all(0 < r["check_rel_error"] < tol for r in doc["expert_ffn"])
    assert all(r["impl"] == "loop" and r["seconds"] > 0 for r in doc["expert_ffn"])
    assert doc["memory"]["gb_per_s"] > 0 and doc["launch"]["seconds"] > 0
    assert doc["host_link"] == {"skipped": "no CUDA device"}
    assert "skipped" in doc["alltoall"] and "skipped" in doc["peer"]
    table, check = fit_cases([r for r in doc["expert_ffn"] if r["matrices"] == 3])
    assert len(table.tokens) == 8 and check["holdout_cases"] >= 1


def test_fp8_needs_a_gpu_with_fp8() -> None:
    from moesim.calibration.torch_backend import TorchBackend

    plan = make_plan([ExpertShape(128, 256, 3, "fp8")], 4, 8, repeats=1)
    with pytest.raises(CalibrationError, match="fp8 needs a CUDA GPU"):
        TorchBackend().measure(plan)


def test_grouped_mm_path_packs_experts_and_passes_its_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The grouped bf16 call that runs on GPUs (experts' rows packed, offsets, one call per
    GEMM), run here through PyTorch's CPU ``_grouped_mm``; uneven and empty experts included."""
    from moesim.calibration.plan import Case, Plan
    from moesim.calibration.torch_backend import TorchBackend

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no _grouped_mm")
    monkeypatch.setenv("MOESIM_TORCH_GROUPED", "1")
    shape = ExpertShape(64, 96, 3, "bf16")
    cases = [Case(shape, counts, str(counts)) for counts in [(5, 0, 17, 2), (0, 0, 0, 9)]]
    plan = Plan(cases, 1 << 20, 1 << 20, repeats=2, warmup=1)
    doc = TorchBackend(seed=3).measure(plan)
    assert [r["impl"] for r in doc["expert_ffn"]] == ["torch._grouped_mm"] * 2
    assert all(0 < r["check_rel_error"] < 2e-2 for r in doc["expert_ffn"])
    monkeypatch.setenv("MOESIM_TORCH_GROUPED", "yes")
    with pytest.raises(CalibrationError, match="MOESIM_TORCH_GROUPED must be"):
        TorchBackend().measure(plan)


def test_fp8_scaled_mm_path_passes_its_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp8 path of GPUs (``torch._scaled_mm`` per expert, rows padded to 16, per-tensor
    weight scales) through PyTorch's CPU ``_scaled_mm``; only the GPU gate is bypassed."""
    from moesim.calibration import torch_backend
    from moesim.calibration.plan import Case, GemmCase, Plan

    if not hasattr(torch, "_scaled_mm"):
        pytest.skip(f"torch {torch.__version__} has no _scaled_mm")
    monkeypatch.setattr(torch_backend, "torch_capability", lambda: (9, 0))
    shape = ExpertShape(64, 96, 3, "fp8")
    gemms = [GemmCase(5, 96, 64, "fp8"), GemmCase(32, 64, 128, "fp8")]
    plan = Plan(
        [Case(shape, (3, 0, 20, 16), "uneven")], 1 << 20, 1 << 20, repeats=2, warmup=1, gemms=gemms
    )
    doc = torch_backend.TorchBackend(seed=2).measure(plan)
    rec = doc["expert_ffn"][0]
    assert rec["impl"] == "loop" and 0 < rec["check_rel_error"] < 8e-2
    assert [r["impl"] for r in doc["gemm"]] == ["torch._scaled_mm"] * 2
    assert all(0 < r["check_rel_error"] < 8e-2 for r in doc["gemm"])


def test_alltoall_measurement_runs_and_checks_on_cpu_ranks() -> None:
    """The all-to-all measurement that runs on NCCL with two or more GPUs, here over gloo with
    two CPU processes: spawn, per-rank output check, timing, the bandwidth columns."""
    from moesim.calibration.torch_backend import measure_alltoall

    out = measure_alltoall(2, [4096, 1 << 16], repeats=3, backend="gloo")
    assert out["world"] == 2 and out["backend"] == "gloo"
    assert [r["bytes"] for r in out["rows"]] == [4096, 1 << 16]
    for r in out["rows"]:
        assert r["seconds"] > 0
        assert r["algbw_gb_per_s"] == pytest.approx(r["bytes"] / r["seconds"] / 1e9)
        assert r["busbw_gb_per_s"] == pytest.approx(r["algbw_gb_per_s"] / 2)
