"""The notebooks run in a real kernel, and what each one shows holds.

Each notebook is executed by nbclient from the repository root (``tests.notebooks``); one more
cell prints the tables it built as JSON, and the checks below read them: the answer each
notebook gives is tested, not only that its cells ran. Notebooks that read the real routing
data skip (with the reason) where it is not beside the project.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable

import pandas as pd
import pytest

from tests.notebooks import DATA, NEEDS_DATA, NOTEBOOKS, execute, last_output

Tables = dict[str, pd.DataFrame]


def _tables(names: list[str]) -> str:
    items = ", ".join(f"{n!r}: {n}.to_json(orient='split')" for n in names)
    return f"import json\nprint(json.dumps({{{items}}}))"


def placement(t: Tables) -> None:
    pre = t["prefill"].set_index(["ep", "placement"])
    for ep in (32, 64):
        # replicas of the hot experts cut the imbalance and the step time at both sizes
        assert pre.loc[(ep, "eplb"), "imbalance"] < 0.8 * pre.loc[(ep, "contiguous"), "imbalance"]
        assert pre.loc[(ep, "eplb"), "step_ms"] < pre.loc[(ep, "contiguous"), "step_ms"]
    red = t["redundancy"].sort_values("redundant")
    assert red["imbalance"].iloc[-1] < red["imbalance"].iloc[0]
    dec = t["decode"]
    assert (dec.loc[dec.rebalance_every == 0, "migration_gb"] == 0).all()
    assert (dec.loc[dec.rebalance_every > 0, "migration_gb"] > 0).all()
    # re-placing more often moves more weights
    moved = dec[dec.rebalance_every > 0].sort_values("rebalance_every")["migration_gb"]
    assert moved.iloc[0] > moved.iloc[-1]


def offload(t: Tables) -> None:
    cache = t["cache"].set_index(["cache_experts", "policy", "prefetch"])
    for size in (16, 32, 48):
        for prefetch in ("none", "affinity", "oracle"):
            # Belady's eviction is the bound: never slower than LRU or LFU
            best = cache.loc[(size, "belady", prefetch), "token_ms"]
            assert best <= cache.loc[(size, "lru", prefetch), "token_ms"]
            assert best <= cache.loc[(size, "lfu", prefetch), "token_ms"]
    hits = cache.xs(("belady", "none"), level=("policy", "prefetch"))["hit_rate"]
    assert hits.is_monotonic_increasing and hits.iloc[0] < hits.iloc[-1]
    where = t["where"].set_index(["cache_experts", "miss"])
    for size in (16, 32, 48):
        cpu, copy = where.loc[(size, "cpu")], where.loc[(size, "copy")]
        assert cpu["pcie_gb_per_token"] < copy["pcie_gb_per_token"] / 100
        assert cpu["token_ms"] < copy["token_ms"]


def alltoall(t: Tables) -> None:
    # the published DeepEP rows: the errors moesim validate records (all within 20%)
    assert (t["validation"]["error"].abs() < 0.2).all()
    for mode in ("decode", "prefill"):
        table = t[mode].set_index(["ep", "algorithm"])
        for ep in table.index.get_level_values("ep").unique():
            direct, hier = table.loc[(ep, "direct")], table.loc[(ep, "hierarchical")]
            # one copy per destination node: fewer inter-node bytes, and faster
            assert hier["inter_node_gb"] < direct["inter_node_gb"]
            assert hier["a2a_ms"] < direct["a2a_ms"]
            # PXN relays over NVLink: the same bytes leave the node
            pxn = table.loc[(ep, "pxn")]
            assert abs(pxn["inter_node_gb"] / direct["inter_node_gb"] - 1) < 1e-6
            assert pxn["intra_node_gb"] > direct["intra_node_gb"]


def capacity(t: Tables) -> None:
    assert (t["depth"]["max_over_mean"] > 1).all()
    grid = t["grid"]
    for (_, drop), g in grid.groupby(["model", "drop"]):
        assert g.sort_values("factor")["drop_rate"].is_monotonic_decreasing, drop
    for _, g in grid.groupby(["model", "factor"]):
        rate = g.set_index("drop")["drop_rate"]
        # the capacity decides how many are dropped, the policy which ones
        assert rate["position"] == rate["probs"] == rate["random"]
        assert rate["reroute"] < rate["position"] or rate["position"] == 0
    at1 = grid[(grid.factor == 1.0) & (grid["drop"] == "position")].set_index("model")
    assert at1.loc["olmoe", "drop_rate"] > at1.loc["qwen1.5-moe", "drop_rate"]
    pos = {d: g["drop_rate"].to_numpy() for d, g in t["by_position"].groupby("drop")}
    assert pos["position"][0] == 0 and pos["position"][-1] > 0.3  # late tokens lose out
    for spread in ("probs", "random"):
        assert pos[spread][0] > 0.5 * pos[spread].mean()


def calibration(t: Tables) -> None:
    tables = t["tables"]
    measured = tables[(tables.profile == "h100-sxm-aiconfigurator") & (tables.status == "measured")]
    assert measured["points"].max() >= 2000
    # the table profile's curve goes through its measured points (m a power of two or not)
    curve = t["curves"][t["curves"].profile == "h100-sxm-aiconfigurator"].set_index("m")["tflops"]
    on = t["points"][t["points"].m.isin(curve.index)]
    assert len(on) >= 3
    for m, tflops in zip(on.m, on.tflops, strict=True):
        assert abs(curve[m] / tflops - 1) < 0.01, m
    err = t["prediction"].set_index("profile")["error"].abs()
    assert err["h100-sxm-aiconfigurator"] < 0.15 < err["h100-sxm"]


def quickstart(t: Tables) -> None:
    table = t["table"]
    assert len(table) == 9
    for _, g in table.groupby("routing"):
        # more capacity, fewer drops
        assert g.sort_values("capacity_factor")["drop_rate"].is_monotonic_decreasing


CHECKS: dict[str, tuple[list[str], Callable[[Tables], None]]] = {
    "placement": (["prefill", "redundancy", "decode"], placement),
    "offload": (["cache", "where"], offload),
    "alltoall": (["validation", "decode", "prefill"], alltoall),
    "calibration": (["tables", "curves", "points", "prediction"], calibration),
    "capacity": (["depth", "grid", "by_position", "by_layer"], capacity),
    "quickstart": (["table"], quickstart),
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_shows_what_it_says(path) -> None:
    if path.stem in NEEDS_DATA and not DATA.exists():
        pytest.skip(f"real routing data absent: {DATA}")
    names, check = CHECKS[path.stem]
    nb, _ = execute(path, _tables(names))
    raw = json.loads(last_output(nb))
    check({n: pd.read_json(io.StringIO(raw[n]), orient="split") for n in names})


def test_every_notebook_is_checked_and_kept_without_outputs() -> None:
    import nbformat

    assert {p.stem for p in NOTEBOOKS} == set(CHECKS)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), path.name
