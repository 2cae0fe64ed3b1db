"""moesim compare and moesim sweep: tables, report folders, run folders as entries, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from moesim.cli import app
from moesim.study.sweep import expand_grid
from tests.conftest import small_scenario

runner = CliRunner()


def _skewed(**extra):
    return small_scenario(
        model="olmoe-1b-7b",
        **{"routing.generator": "zipf", "routing.skew": 1.2, "workload.steps": 2, **extra},
    )


def test_compare_scenarios_and_run_folders(write_scenario, tmp_path: Path) -> None:
    a = write_scenario(_skewed(name="contig"), "a.yaml")
    b = write_scenario(
        _skewed(
            name="eplb",
            **{"policies.placement": {"type": "eplb", "redundant_experts": 16}},
        ),
        "b.yaml",
    )
    out = tmp_path / "res"
    ran = runner.invoke(app, ["run", str(a), "--out", str(out)])
    assert ran.exit_code == 0, ran.output
    run_dir = next((out / "contig").iterdir())
    res = runner.invoke(app, ["compare", str(run_dir), str(b), "--json", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["run"] for r in rows] == ["contig", "eplb"]
    assert [r["placement"] for r in rows] == ["contiguous", "eplb"]
    # EPLB with redundant experts lowers the imbalance of skewed routing
    assert rows[1]["imbalance"] < rows[0]["imbalance"]
    folder = next((out / "compare").iterdir())
    assert {p.name for p in folder.iterdir()} == {"report.html", "compare.csv", "summaries.json"}
    page = (folder / "report.html").read_text()
    assert "plotly" in page
    # the headline of both runs side by side comes before the figures
    assert page.index(">step time<") < page.index("plotly-graph-div")
    assert page.index(">contig<") < page.index(">eplb<") < page.index("plotly-graph-div")
    # the table printed for people has a column per run
    res = runner.invoke(app, ["compare", str(a), str(a), "--no-write"])
    assert res.exit_code == 0 and "contig #2" in res.stdout


def test_compare_rejects_what_is_neither(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hi")
    res = runner.invoke(app, ["compare", str(tmp_path / "x.txt"), "--no-write"])
    assert res.exit_code != 0 and "expected a scenario .yaml or a run folder" in res.output
    res = runner.invoke(app, ["compare", str(tmp_path), "--no-write"])
    assert res.exit_code != 0 and "no summary.json" in res.output


def test_expand_grid_is_the_cartesian_product_in_order() -> None:
    assert expand_grid(["a=1,2", "b.c=x,y"]) == [
        ["a=1", "b.c=x"],
        ["a=1", "b.c=y"],
        ["a=2", "b.c=x"],
        ["a=2", "b.c=y"],
    ]


def test_sweep_writes_one_parquet_table_and_reports_failures(
    write_scenario, tmp_path: Path
) -> None:
    path = write_scenario(_skewed())
    res = runner.invoke(
        app,
        [
            "sweep",
            str(path),
            "--grid",
            "policies.placement.type=contiguous,eplb",
            "--grid",
            "policies.placement.redundant_experts=0,16",
            "--jobs",
            "2",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 1, res.output  # contiguous cannot hold redundant experts
    folder = next((tmp_path / "tiny").iterdir())
    table = pd.read_parquet(folder / "sweep.parquet")
    assert len(table) == 4
    assert table["policies.placement.type"].tolist() == ["contiguous"] * 2 + ["eplb"] * 2
    failed = table[table["error"] != ""]
    assert len(failed) == 1 and "redundant_experts" in failed["error"].iloc[0]
    ok = table[table["error"] == ""]
    assert (ok["step_time_ms"] > 0).all()
    eplb16 = ok[
        (ok["policies.placement.type"] == "eplb")
        & (ok["policies.placement.redundant_experts"] == 16)
    ]
    assert eplb16["imbalance"].iloc[0] < ok["imbalance"].iloc[0]
    # the report opens on a headline row per point that ran (the failed one has none)
    page = (folder / "report.html").read_text()
    head = page[: page.index("plotly-graph-div")]
    assert ">step time<" in head and head.count("policies.placement.type=") == 3


def test_sweep_on_a_local_dask_cluster_gives_the_local_table(write_scenario) -> None:
    """Dask workers get each point's resolved scenario and return the same summaries, byte for
    byte, as a run here; an invalid point is reported without being sent."""
    pytest.importorskip("distributed", reason="`make test` installs moesim[distributed]")
    from moesim.study.sweep import run_sweep

    path = write_scenario(_skewed())
    grid = ["policies.placement.type=contiguous,eplb", "policies.placement.redundant_experts=0,16"]
    here, here_s = run_sweep(path, grid, jobs=1)
    ticks: list[tuple[int, int]] = []
    dask, dask_s = run_sweep(
        path, grid, jobs=2, scheduler="local", progress=lambda d, n: ticks.append((d, n))
    )
    assert json.dumps(dask_s, sort_keys=True) == json.dumps(here_s, sort_keys=True)
    pd.testing.assert_frame_equal(dask, here)
    assert (dask["error"] != "").sum() == 1
    assert ticks[-1] == (4, 4) and ticks[0] == (1, 4)  # the invalid point is counted first


def test_sweep_names_an_unreachable_dask_scheduler(write_scenario, monkeypatch) -> None:
    pytest.importorskip("distributed", reason="`make test` installs moesim[distributed]")
    import moesim.study.sweep

    monkeypatch.setattr(moesim.study.sweep, "CONNECT_TIMEOUT_S", 1)
    path = write_scenario(_skewed())
    res = runner.invoke(
        app,
        ["sweep", str(path), "--grid", "workload.steps=1,2", "--scheduler", "tcp://127.0.0.1:9"],
    )
    assert res.exit_code != 0
    assert "--scheduler" in res.output and "cannot reach the Dask scheduler" in res.output
