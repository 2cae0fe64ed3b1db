"""The README's Python examples run as written (from a folder holding the shipped scenarios),
and the notebook API returns what they show."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, SCENARIOS

BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2 and any("moesim.compare(" in b for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example_runs(block: str, tmp_path: Path) -> None:
    (tmp_path / "scenarios").symlink_to(SCENARIOS)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(block, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)


def test_compare_and_sweep_return_tables(tmp_path: Path) -> None:
    import moesim

    quick = SCENARIOS / "quickstart.yaml"
    table = moesim.compare(quick, quick, overrides=["workload.steps=1"])
    assert isinstance(table, pd.DataFrame)
    assert list(table["run"]) == ["quickstart #1", "quickstart #2"]
    summaries = table.attrs["summaries"]
    assert table["step_time_ms"].iloc[0] == pytest.approx(
        summaries["quickstart #1"]["step_time_s"] * 1e3
    )
    grid = moesim.sweep(quick, {"policies.capacity.factor": [1.0, 2.0]}, ["workload.steps=1"])
    assert list(grid["policies.capacity.factor"]) == [1.0, 2.0]
    assert grid["drop_rate"].iloc[0] > grid["drop_rate"].iloc[1]  # more room, fewer drops
    assert (grid["error"] == "").all() and len(grid.attrs["summaries"]) == 2
    with pytest.raises(ValueError, match="at least one"):
        moesim.compare()
