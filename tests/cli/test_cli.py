"""The command line: run --json, check, catalogs, and errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from moesim.cli import app
from tests.conftest import ROOT, small_scenario

runner = CliRunner()


def test_run_json_prints_the_summary(write_scenario, tmp_path: Path) -> None:
    path = write_scenario(small_scenario())
    res = runner.invoke(app, ["run", str(path), "--json", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["scenario"] == "tiny" and summary["step_time_s"] > 0
    assert len(list((tmp_path / "r" / "tiny").iterdir())) == 1


def test_run_table_names_the_folder(write_scenario, tmp_path: Path) -> None:
    path = write_scenario(small_scenario())
    res = runner.invoke(
        app, ["run", str(path), "--out", str(tmp_path), "--set", "workload.steps=1"]
    )
    assert res.exit_code == 0, res.output
    assert "step time" in res.stdout and "run folder" in res.stdout


def test_bad_scenario_is_a_message_not_a_traceback(write_scenario) -> None:
    path = write_scenario(small_scenario(**{"workload.batch_size": "lots"}))
    proc = subprocess.run(
        [sys.executable, "-m", "moesim", "run", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{path}: workload.batch_size:" in proc.stderr


def test_check_validates_without_running(write_scenario, tmp_path: Path) -> None:
    path = write_scenario(small_scenario())
    res = runner.invoke(app, ["check", str(path)])
    assert res.exit_code == 0 and "ok tiny" in res.stdout
    res = runner.invoke(app, ["check", str(path), "--set", "parallelism.ep=3"])
    assert res.exit_code == 2


def test_catalog_commands() -> None:
    assert "deepseek-v3" in runner.invoke(app, ["models", "list"]).stdout
    shown = json.loads(runner.invoke(app, ["models", "show", "mixtral-8x7b", "--json"]).stdout)
    assert shown["moe"]["num_experts"] == 8
    assert "h800" in runner.invoke(app, ["profiles", "list"]).stdout
    prof = json.loads(runner.invoke(app, ["profiles", "show", "h100-sxm", "--json"]).stdout)
    assert "node.nic_gb_per_s" in prof["sources"]


def test_import_is_light() -> None:
    code = (
        "import sys, moesim, moesim.cli; "
        "heavy = [m for m in ('simpy', 'plotly', 'pandas', 'torch', 'pyarrow') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_profiles_show_topology_draws_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "topo.html"
    res = runner.invoke(
        app, ["profiles", "show", "l40s-pcie", "--topology", "--nodes", "2", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert "pcisw0" in html and "leaf0" in html and "spine" in html
    again = runner.invoke(app, ["profiles", "show", "l40s-pcie", "--topology", "--out", str(out)])
    assert again.exit_code == 2


def test_schema_prints_the_scenario_and_profile_json_schema() -> None:
    from moesim.config.scenario import Scenario
    from moesim.hardware.profile import HardwareProfile

    res = CliRunner().invoke(app, ["schema"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["$schema"].endswith("2020-12/schema")
    assert set(doc["properties"]) == set(Scenario.model_fields)
    workload = doc["$defs"]["Workload"]["properties"]
    assert {"gradient_dtype", "cuda_graphs", "recompute"} <= set(workload)
    assert workload["recompute"]["enum"] == ["none", "selective", "full"]
    prof = json.loads(CliRunner().invoke(app, ["schema", "profile"]).output)
    assert set(prof["properties"]) == set(HardwareProfile.model_fields)
    bad = CliRunner().invoke(app, ["schema", "model"])
    assert bad.exit_code == 2 and "expected scenario or profile" in bad.output
