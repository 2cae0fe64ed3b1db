"""The notebook API: ``moesim.compare`` and ``moesim.sweep`` return DataFrames.

>>> import moesim
>>> table = moesim.compare("scenarios/a.yaml", "results/b/<run-id>")   # doctest: +SKIP
>>> table = moesim.sweep("scenarios/quickstart.yaml",                   # doctest: +SKIP
...                      {"policies.capacity.factor": [1.0, 1.25, 1.5]})

Both tables have the comparison columns of :data:`moesim.study.compare.COLUMNS` (step time,
tokens/s, exposed communication, imbalance, drop rate, HBM, offload stall, inter-node bytes);
the summaries behind the rows are in ``table.attrs["summaries"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def compare(*entries: str | Path, overrides: Sequence[str] = ()) -> pd.DataFrame:
    """One row per scenario file (simulated, nothing written) or run folder (read).

    Args:
        entries: Scenario ``.yaml`` files or run folders.
        overrides: ``key.path=value`` settings applied to every scenario file.

    Returns:
        The comparison table, one row per entry labelled by scenario name (``run``), with
        the policies that differ and the metrics; ``attrs["summaries"]``: label -> summary.
    """
    from moesim.study.compare import compare as compare_entries

    if not entries:
        raise ValueError("compare needs at least one scenario file or run folder")
    table, summaries = compare_entries(list(entries), list(overrides))
    table.attrs["summaries"] = summaries
    return table


def sweep(
    scenario: str | Path,
    grid: Mapping[str, Sequence[Any]] | Sequence[str],
    overrides: Sequence[str] = (),
    jobs: int = 1,
) -> pd.DataFrame:
    """Run ``scenario`` at every point of the Cartesian product of ``grid``.

    Args:
        scenario: The scenario file.
        grid: ``{"key.path": [v1, v2, ...], ...}``, or the CLI's ``["key.path=v1,v2", ...]``.
        overrides: Settings applied to every point.
        jobs: Local worker processes (1 runs here).

    Returns:
        One row per point: the grid values, the comparison columns and ``error`` (empty when
        the point ran); ``attrs["summaries"]``: the summaries in grid order.
    """
    from moesim.study.sweep import run_sweep

    if isinstance(grid, Mapping):
        axes = [f"{key}={','.join(str(v) for v in values)}" for key, values in grid.items()]
    else:
        axes = list(grid)
    table, summaries = run_sweep(scenario, axes, list(overrides), jobs)
    table.attrs["summaries"] = summaries
    return table
