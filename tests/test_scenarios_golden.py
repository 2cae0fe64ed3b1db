"""Every shipped scenario runs through the CLI as a user runs it (run folder and report written),
its printed summary is strict JSON and matches its stored golden summary; runs are deterministic.

Regenerate the goldens after an intended change of results with
``python -m tests.golden.regenerate`` and explain the change in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from moesim.cli import app
from moesim.config.loading import load_scenario
from moesim.results.writer import summary_json
from moesim.runner import simulate
from tests.conftest import ROOT, SCENARIOS, strict_json

GOLDEN = ROOT / "tests" / "golden"


def _close(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _close(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _close(x, y, f"{path}[{i}]")
        ]
    if isinstance(a, float) and isinstance(b, (int, float)):
        return [] if a == pytest.approx(b, rel=1e-9, abs=1e-15) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.stem)
def test_scenario_runs_through_the_cli_and_matches_golden(path: Path, tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    summary = strict_json(out.stdout)
    (folder,) = (tmp_path / summary["scenario"]).iterdir()
    assert (folder / "report.html").stat().st_size > 10_000
    assert strict_json((folder / "summary.json").read_text()) == summary
    if summary["mode"] == "serve":  # a serving run: its requests and steps
        requests = pd.read_parquet(folder / "requests.parquet")
        assert len(requests) == summary["serving"]["requests"]
        assert len(pd.read_parquet(folder / "steps.parquet")) == summary["serving"]["steps"]
    else:
        strict_json((folder / "timeline.json").read_text())
    golden = GOLDEN / f"{path.stem}.json"
    assert golden.exists(), f"no golden for {path.name}: run python -m tests.golden.regenerate"
    diffs = _close(json.loads(golden.read_text()), summary)
    assert not diffs, "\n".join(diffs)


def test_same_scenario_and_seed_give_identical_bytes() -> None:
    r = load_scenario(SCENARIOS / "quickstart.yaml")
    assert summary_json(simulate(r).summary) == summary_json(simulate(r).summary)


def test_another_seed_changes_the_routing() -> None:
    a = simulate(load_scenario(SCENARIOS / "quickstart.yaml")).summary
    b = simulate(load_scenario(SCENARIOS / "quickstart.yaml", ["seed=1"])).summary
    assert a["tokens_dropped"] != b["tokens_dropped"]
