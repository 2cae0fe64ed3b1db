"""Run folders: every file present and readable, atomic, never overwritten."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from moesim.config.loading import load_scenario
from moesim.results import writer
from moesim.runner import simulate, write_run
from tests.conftest import small_scenario


@pytest.fixture
def result(write_scenario):
    return simulate(load_scenario(write_scenario(small_scenario())))


def test_run_folder_has_every_file(result, tmp_path: Path) -> None:
    folder = write_run(result, tmp_path / "results")
    assert folder.parent == tmp_path / "results" / "tiny"
    names = {p.name for p in folder.iterdir()}
    assert names == {
        "scenario.yaml",
        "summary.json",
        "layers.parquet",
        "links.parquet",
        "timeline.json",
        "report.html",
    }
    summary = json.loads((folder / "summary.json").read_text())
    for key in (
        "step_time_s",
        "tokens_per_s",
        "breakdown_s",
        "imbalance_max_over_mean",
        "drop_rate",
        "bytes_intra_node",
        "bytes_inter_node",
        "hbm_peak_bytes",
    ):
        assert key in summary
    for key in ("attention", "dispatch", "expert_compute", "combine", "exposed_comm"):
        assert key in summary["breakdown_s"]
    table = pd.read_parquet(folder / "layers.parquet")
    assert len(table) == 2 * 32 * 8  # steps x layers x gpus
    links = pd.read_parquet(folder / "links.parquet")
    assert list(links.columns) == [
        "phase",
        "start_s",
        "end_s",
        "link",
        "kind",
        "bytes",
        "utilisation",
    ]
    # the intra-node bytes of the summary are the NVLink bytes, counted once per flow
    nvlink = links[links["kind"] == "nvlink"]["bytes"].sum() / 2 / 2  # up + down, 2 steps
    assert nvlink == pytest.approx(summary["bytes_intra_node"], rel=1e-6)
    trace = json.loads((folder / "timeline.json").read_text())
    assert {e["ph"] for e in trace["traceEvents"]} == {"M", "X"}
    assert "plotly" in (folder / "report.html").read_text()[:5_000_000].lower()


def test_second_run_gets_its_own_folder(result, tmp_path: Path) -> None:
    a = write_run(result, tmp_path)
    b = write_run(result, tmp_path)
    assert a != b and a.exists() and b.exists()


def test_failure_leaves_nothing_half_written(result, tmp_path: Path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer, "resolved_yaml", boom)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        write_run(result, out)
    leftovers = [p for p in out.rglob("*") if p.is_file() or p.name.startswith(".")]
    assert leftovers == []


def test_a_killed_writers_hidden_folder_is_removed_by_the_next_run(result, tmp_path: Path) -> None:
    import subprocess

    base = tmp_path / "results" / "tiny"
    base.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = base / f".20260101T000000Z-seed0.pid{dead.pid}.abc"
    left.mkdir()
    (left / "summary.json").write_text("{")
    mine = base / f".20260101T000000Z-seed0.pid{os.getpid()}.abc"  # a live writer's
    mine.mkdir()
    write_run(result, tmp_path / "results")
    assert not left.exists() and mine.exists()


def test_report_opens_on_the_headline(result, tmp_path: Path) -> None:
    from moesim.results.report import cost_origin, headline

    s = result.summary
    rows = {label: (value, detail) for label, value, detail in headline(s)}
    assert rows["step time"][0] == f"{s['step_time_s'] * 1e3:,.3f} ms"  # as the CLI prints it
    assert rows["tokens/s"][0] == f"{s['tokens_per_s']:,.0f}"
    exposed = s["breakdown_s"]["exposed_comm"] / s["step_time_s"]
    assert rows["exposed communication"][1] == f"{exposed:.0%} of the step"
    assert (
        rows["HBM per GPU"][1] == f"{s['hbm_peak_bytes'] / s['hbm_capacity_bytes']:.0%} of capacity"
    )
    assert rows["op costs"][0] == f"{len(s['cost_sources'])} ops"
    assert cost_origin("deepgemm fp8 dense table (published: DeepGEMM)") == "published tables"
    assert cost_origin("gemm linear table (measured: aiconfigurator)") == "measured tables"
    assert cost_origin("HBM 3350 GB/s x memory_efficiency 0.9") == "roofline / bandwidth"
    page = (write_run(result, tmp_path) / "report.html").read_text()
    first_figure = page.index("plotly-graph-div")
    assert page.index(">step time<") < first_figure and page.index(">op costs<") < first_figure
