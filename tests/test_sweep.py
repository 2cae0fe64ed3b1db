"""Sweeps survive interruption: saved points, --resume to the same table, no stray workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moesim import jsonout
from moesim.study.sweep import PointStore, run_sweep
from tests.conftest import small_scenario

GRID = ["workload.batch_size=64,128,192,256", "policies.placement.type=contiguous,greedy"]
MOESIM = str(Path(sys.executable).with_name("moesim"))


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _gone(pids: list[int], within_s: float = 10) -> bool:
    deadline = time.time() + within_s
    while time.time() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.fixture
def scenario(tmp_path: Path) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(small_scenario(**{"workload.steps": 12})))
    return path


def _start(scenario: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = [MOESIM, "sweep", str(scenario), "--out", str(out), "--jobs", "2", *extra]
    return subprocess.Popen(
        [*args, *(a for g in GRID for a in ("--grid", g))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _points_folder(out: Path) -> Path:
    deadline = time.time() + 60
    while time.time() < deadline:
        found = list(out.glob("tiny/*.points"))
        if found and len(list(found[0].glob("point-*.json"))) >= 2:
            return found[0]
        time.sleep(0.05)
    raise AssertionError("the sweep saved no points within 60 s")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_sweep_leaves_no_workers_and_resumes_to_the_same_table(
    scenario: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    out = tmp_path / "out"
    proc = _start(scenario, out)
    folder = _points_folder(out)
    workers = _children(proc.pid)
    assert workers, "the sweep runs its points in worker processes"
    os.kill(proc.pid, sig)
    proc.wait(timeout=30)
    assert _gone(workers), f"worker processes left behind after {sig.name}: {workers}"
    saved = len(list(folder.glob("point-*.json")))
    assert 2 <= saved < 8 and not list(out.glob("tiny/*-sweep"))

    resumed = _start(scenario, out, "--resume", str(folder))
    assert resumed.wait(timeout=300) == 0
    assert not folder.exists(), "the points folder goes once the sweep folder is written"
    (final,) = out.glob("tiny/*-sweep")
    whole, summaries = run_sweep(scenario, GRID, jobs=1)
    pd.testing.assert_frame_equal(pd.read_parquet(final / "sweep.parquet"), whole)
    expected = jsonout.dumps(summaries, indent=2, sort_keys=True) + "\n"
    assert (final / "summaries.json").read_text() == expected


def test_resume_refuses_another_sweeps_points(scenario: Path, tmp_path: Path) -> None:
    from moesim.errors import ConfigError

    plan = PointStore.plan_of(scenario, [["workload.steps=1"], ["workload.steps=2"]])
    store = PointStore.create(tmp_path, plan)
    store.save(1, {"error": "x"})
    assert PointStore.resume(store.folder, plan).done() == {1: {"error": "x"}}
    other = PointStore.plan_of(scenario, [["workload.steps=1"]])
    with pytest.raises(ConfigError, match="the grid or --set overrides differ"):
        PointStore.resume(store.folder, other)
    scenario.write_text(scenario.read_text() + "\n# changed\n")
    with pytest.raises(ConfigError, match="the scenario file changed"):
        PointStore.resume(store.folder, PointStore.plan_of(scenario, plan["points"]))


def test_a_point_that_hits_a_bug_does_not_abort_the_sweep(
    scenario: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moesim.runner

    real = moesim.runner.simulate

    def buggy(resolved, progress=None):
        if resolved.scenario.workload.batch_size == 128:
            raise TypeError("a bug")
        return real(resolved, progress)

    monkeypatch.setattr(moesim.runner, "simulate", buggy)
    table, _ = run_sweep(scenario, ["workload.batch_size=64,128"], jobs=1)
    assert table["error"].tolist()[0] == ""
    assert "TypeError: a bug (a moesim bug" in table["error"].tolist()[1]
