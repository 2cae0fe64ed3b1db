"""``moesim calibrate --backend cpu`` end to end, and a scenario run on the profile it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from moesim.calibration.fit import ExpertTimeTable
from moesim.cli.app import app
from moesim.config.loading import load_scenario
from moesim.hardware.catalog import load_profile
from moesim.runner import simulate
from moesim.timing.costs import cost_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cal")
    model = tmp / "tiny-moe.yaml"
    from tests.calibration.conftest import TINY_MODEL

    model.write_text(TINY_MODEL, encoding="utf-8")
    out = tmp / "profiles" / "tiny-cpu.yaml"
    args = [
        "calibrate",
        "--backend",
        "cpu",
        "--profile",
        "h100-sxm",
        "--model",
        str(model),
        "--max-tokens",
        "64",
        "--repeats",
        "5",
        "--copy-mib",
        "32",
        "--out",
        str(out),
        "--results",
        str(tmp / "results"),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "held-out" in res.output and "memory copy" in res.output
    return out, model


def test_cpu_calibration_writes_raw_data_plot_and_a_profile_citing_them(
    calibrated: tuple[Path, Path],
) -> None:
    out, _ = calibrated
    prof = load_profile(str(out))
    assert prof.calibration is not None and prof.calibration.backend == "cpu"
    raw = (out.parent / prof.calibration.measurements).resolve()
    assert raw.is_file() and raw.with_suffix(".html").is_file()
    doc = json.loads(raw.read_text())
    assert doc["format"] == "moesim-calibration/1"
    assert doc["host_link"] == {"skipped": "the cpu backend has no device-host link"}
    (fit,) = doc["fit"].values()
    table = prof.calibration.experts[0]
    assert (table.hidden, table.width, table.matrices, table.dtype) == (256, 512, 3, "fp32")
    assert table.holdout_cases == fit["holdout_cases"] >= 1
    # every case was checked against float64 before it was timed; inputs were random
    assert all(r["check_rel_error"] < 1e-4 for r in doc["expert_ffn"])
    assert all(len(r["samples"]) == 5 for r in doc["expert_ffn"])
    # measured figures cite the raw file; the rest keep the base profile's sources
    assert str(prof.calibration.measurements) in prof.sources["gpu.memory_efficiency"]
    assert prof.gpu.memory_efficiency == pytest.approx(
        doc["memory"]["gb_per_s"] / prof.gpu.hbm_bandwidth_gb_per_s, rel=1e-3
    )
    assert (
        prof.sources["node.nic_gb_per_s"] == load_profile("h100-sxm").sources["node.nic_gb_per_s"]
    )
    # dense GEMMs of every projection the op-level model prices, in the same table format as
    # published and imported tables, placed first so that the measurement is the one used
    (gemm,) = [t for t in prof.kernels.gemm if t.dtype == "fp32"]
    assert gemm.status == "measured" and str(prof.calibration.measurements) in gemm.source
    assert prof.kernels.gemm[0] is gemm
    assert {(p[2], p[3]) for p in gemm.points} >= {(1024, 256), (256, 512), (8, 256)}
    assert sorted({p[1] for p in gemm.points}) == [1, 2, 4, 8, 16, 32, 64]
    assert all(r["check_rel_error"] < 1e-4 for r in doc["gemm"])
    measured = {(r["m"], r["n"], r["k"]): r["seconds"] for r in doc["gemm"]}
    from moesim.timing.kernels import GemmModel

    gm = GemmModel(prof, prof.gpu.sm_count)
    for _, m, n, k, _ in gemm.points[:: max(1, len(gemm.points) // 20)]:
        assert float(gm.time(m, n, k, "fp32")) == pytest.approx(measured[(m, n, k)], rel=1e-4)


def test_a_scenario_on_the_calibrated_profile_uses_the_tables(
    calibrated: tuple[Path, Path], tmp_path: Path
) -> None:
    out, model = calibrated
    scen = tmp_path / "s.yaml"
    scen.write_text(
        yaml.safe_dump(
            {
                "name": "tiny-cal",
                "model": str(model),
                "hardware": str(out),
                "cluster": {"nodes": 1},
                "parallelism": {"ep": 8, "tp": 1, "dp": 1},
                "workload": {
                    "mode": "decode",
                    "batch_size": 64,
                    "context_len": 128,
                    "steps": 2,
                    "dtype": "fp32",
                },
                "policies": {"capacity": {"type": "dropless"}},
            }
        )
    )
    r = load_scenario(scen)
    costs = cost_model(r.hardware, r.model, "fp32", 1)
    assert costs.expert_table is not None
    t = r.hardware.calibration.experts[0]  # type: ignore[union-attr]
    table = ExpertTimeTable(np.array(t.tokens), np.array(t.seconds), t.overhead_s)
    v = np.array([[3, 0, 17, 1], [0, 0, 0, 0]])
    ops = costs.experts(v)
    assert ops["experts_calibrated"].tolist() == table.predict(v).tolist()
    # the table replaces the grouped GEMMs and SwiGLU; permute and unpermute stay
    assert "expert_gate_up" not in ops and set(ops) == {
        "permute",
        "experts_calibrated",
        "unpermute",
    }
    summary = simulate(r).summary
    assert summary["cost_sources"]["experts_calibrated"].startswith("calibrated: ")
    assert summary["cost_sources"]["attn_core"].startswith("roofline")
    # the fp32 projections come from the measured GEMM table (the router runs in bf16)
    for op in ("qkv_proj", "o_proj"):
        assert "fp32 dense table (measured: by `moesim calibrate" in summary["cost_sources"][op]
    # another dtype has no table: the roofline, and the summary says why
    other = cost_model(r.hardware, r.model, "bf16", 1)
    assert other.expert_table is None
    assert "not for hidden 256" in other.source


def test_calibrate_never_overwrites_and_rejects_what_the_cpu_cannot_measure(
    calibrated: tuple[Path, Path],
) -> None:
    out, model = calibrated
    res = CliRunner().invoke(
        app, ["calibrate", "--backend", "cpu", "--model", str(model), "--out", str(out)]
    )
    assert res.exit_code == 2 and "never overwrites" in res.output
    res = CliRunner().invoke(
        app,
        [
            "calibrate",
            "--backend",
            "cpu",
            "--model",
            str(model),
            "--dtype",
            "bf16",
            "--out",
            str(out.with_name("x.yaml")),
        ],
    )
    assert res.exit_code == 2 and "fp32 only" in res.output
    assert not out.with_name("x.yaml").exists()


def test_a_profile_calibration_table_must_be_well_formed(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "moesim" / "hardware" / "profiles" / "h100-sxm.yaml").read_text())
    data["calibration"] = {
        "backend": "cpu",
        "device": "x",
        "created": "now",
        "measurements": "m.json",
        "experts": [
            {
                "hidden": 8,
                "width": 8,
                "matrices": 3,
                "dtype": "fp32",
                "tokens": [4, 2],
                "seconds": [1e-6, 2e-6],
                "overhead_s": 0,
                "holdout_cases": 1,
                "holdout_max_abs_error": 0.01,
            }
        ],
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    from moesim.errors import ConfigError, ConfigErrors

    with pytest.raises((ConfigError, ConfigErrors), match="ascending"):
        load_profile(str(path))


def test_calibrate_states_its_cost_and_refuses_a_plan_too_big_for_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moesim.estimate
    from moesim.calibration.plan import make_plan, plan_cost, shapes_for
    from moesim.models.presets import load_preset

    monkeypatch.setattr(moesim.estimate, "available_memory", lambda: 24.0 * 2**30)
    args = ["calibrate", "--backend", "cpu", "--model", "mixtral-8x7b", "--experts", "64"]
    args += ["--max-tokens", "4096", "--out", str(tmp_path / "p.yaml")]
    res = CliRunner().invoke(app, [*args, "--results", str(tmp_path / "raw")])
    assert res.exit_code == 2
    assert "plan: 72 cases of 1 expert shape(s), roughly" in res.stderr
    assert "needs 150.5 GiB at once but this machine's free memory is 24.0 GiB" in res.stderr
    assert "--max-tokens" in res.stderr
    assert not (tmp_path / "raw").exists() and not (tmp_path / "p.yaml").exists()
    # the cost by hand: one set of 64 experts' fp32 weights (3 x 4096 x 14336) and inputs
    # [64, most, 4096]; every call (one timed repeat and the check) computes 2 x 3 x h x w
    # FLOPs per token
    shape = shapes_for(load_preset("mixtral-8x7b"), 1, ["fp32"])
    plan = make_plan(shape, 64, 4096, repeats=1, warmup=0, copy_bytes=1)
    cost = plan_cost(plan, 1e12, {"fp32": 4.0})
    most = max(max(c.counts) for c in plan.cases)  # a skewed case's busiest expert
    assert cost.peak_bytes == 4.0 * 64 * (3 * 14336 + most) * 4096
    calls = sum(2 * 2 * 3 * 4096 * 14336 * sum(c.counts) for c in plan.cases)
    assert cost.seconds == pytest.approx(calls / 1e12)
