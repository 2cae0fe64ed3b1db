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
    plan = make_plan(shapes, 4, 16, repeats=3, warmup=1, copy_bytes=8 << 20)
    doc = TorchBackend(seed=1).measure(plan)
    assert doc["backend"] == "torch" and doc["device"].startswith("CPU")
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
