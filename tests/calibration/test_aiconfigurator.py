"""The AIConfigurator importer: the shipped measured profile is what the importer writes, the
tables reproduce the package's measured latencies, and models run on them.

aiconfigurator-core is installed by `make test` (the aiconfigurator extra); CI must not skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from moesim.cli import app
from moesim.config.loading import load_scenario
from moesim.hardware.catalog import load_profile
from moesim.models.presets import load_preset
from moesim.runner import simulate
from moesim.timing.costs import CostOptions, OpCostModel
from moesim.timing.kernels import GemmModel
from tests.conftest import ROOT

SHIPPED = ROOT / "moesim" / "hardware" / "profiles" / "h100-sxm-aiconfigurator.yaml"


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    if os.environ.get("CI"):
        import aiconfigurator_core  # noqa: F401  (CI installs it: a skip would test nothing)
    else:
        pytest.importorskip("aiconfigurator_core", reason="pip install 'moesim[aiconfigurator]'")
    from moesim.calibration.aiconfigurator import find_data

    return find_data()


def _import(out: Path, *extra: str) -> object:
    return CliRunner().invoke(
        app,
        ["calibrate", "--from", "aiconfigurator", "--system", "h100_sxm", "--backend", "sglang",
         "--model", "deepseek-v3", "--model", "mixtral-8x7b", "--out", str(out), *extra],
    )  # fmt: skip


def test_the_shipped_profile_is_what_the_importer_writes(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / SHIPPED.name
    res = _import(out)
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    assert out.read_bytes() == SHIPPED.read_bytes(), "run `make profiles` and commit the result"
    again = _import(out)
    assert again.exit_code != 0 and "never overwrites" in again.output  # type: ignore[attr-defined]


def test_gemm_points_reproduce_the_measured_latencies(data) -> None:  # type: ignore[no-untyped-def]
    hw = load_profile("h100-sxm-aiconfigurator")
    table = next(t for t in hw.kernels.gemm if t.dtype == "fp8")
    assert table.status == "measured" and "gemm_perf.parquet" in table.source
    path = data.latest("h100_sxm", "gemm", "sglang", "gemm_perf.parquet")
    raw = pd.read_parquet(path)
    raw = raw[raw.gemm_dtype == "fp8_block"].set_index(["m", "n", "k"]).latency
    gm = GemmModel(hw, hw.gpu.sm_count)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(table.points), 40, replace=False):
        _, m, n, k, _ = table.points[i]
        measured = float(raw.loc[(m, n, k)]) * 1e-3
        assert float(gm.time(m, n, k, "fp8")) == pytest.approx(measured, rel=1e-4)


def test_mla_prefill_table_reproduces_a_measured_attention(data) -> None:  # type: ignore[no-untyped-def]
    hw, model = load_profile("h100-sxm-aiconfigurator"), load_preset("deepseek-v3")
    path = data.latest("h100_sxm", "mla", "sglang", "context_mla_perf.parquet")
    raw = pd.read_parquet(path)
    row = raw[(raw.num_heads == 128) & (raw.tp_size == 1) & (raw.mla_dtype == "bfloat16")
              & (raw.kv_cache_dtype == "bfloat16") & (raw.isl == 4096)]  # fmt: skip
    row = row.sort_values("batch_size").iloc[-1]
    cm = OpCostModel(hw, model, CostOptions(dtype="fp8", cuda_graphs=True))
    tokens = float(row.batch_size * row.isl)
    core = cm.attention(tokens, row.isl / 2, 0.0, False, row.isl)["attn_core"]
    assert float(core) == pytest.approx(row.latency * 1e-3, rel=1e-4)


@pytest.mark.parametrize(
    ("scenario", "expect"),
    [("deepseek-v3-prefill-64xh800.yaml", "mla"), ("mixtral-8x7b-decode-8xh100.yaml", "fa3")],
)
def test_deepseek_and_mixtral_run_on_the_measured_tables(data, scenario: str, expect: str) -> None:  # type: ignore[no-untyped-def]
    r = load_scenario(
        ROOT / "scenarios" / scenario,
        ["hardware=h100-sxm-aiconfigurator", "workload.steps=1", "cluster.nodes=8"]
        if "deepseek" in scenario
        else ["hardware=h100-sxm-aiconfigurator", "workload.steps=2"],
    )
    summary = simulate(r).summary
    sources = summary["cost_sources"]
    measured = [op for op, src in sources.items() if "measured: aiconfigurator-core" in src]
    assert {"attn_core", "o_proj", "expert_gate_up", "expert_down", "router"} <= set(measured)
    assert expect in sources["attn_core"]
    assert summary["ops_s"]["attn_core"] > 0


def test_bad_imports_are_clear_errors(tmp_path: Path) -> None:
    res = _import(tmp_path / "x.yaml", "--data", str(tmp_path / "missing"))
    assert res.exit_code != 0 and "not a folder" in res.output  # type: ignore[attr-defined]
    empty = tmp_path / "data"
    empty.mkdir()
    res = _import(tmp_path / "x.yaml", "--data", str(empty))
    assert res.exit_code != 0 and "no gemm/sglang/*/gemm_perf.parquet" in res.output  # type: ignore[attr-defined]
    res = CliRunner().invoke(
        app, ["calibrate", "--from", "aiconfigurator", "--system", "nowhere", "--model",
              "deepseek-v3", "--out", str(tmp_path / "y.yaml")],
    )  # fmt: skip
    assert res.exit_code != 0 and "no shipped profile for system 'nowhere'" in res.output
    res = _import(tmp_path / "x.txt")
    assert res.exit_code != 0 and "expected a .yaml file" in res.output  # type: ignore[attr-defined]
    res = CliRunner().invoke(app, ["calibrate", "--from", "elsewhere", "--out", "z.yaml"])
    assert res.exit_code != 0 and "--from must be device or aiconfigurator" in res.output
    assert not list(tmp_path.glob("*.yaml"))
