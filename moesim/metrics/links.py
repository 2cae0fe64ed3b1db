"""Per-link utilisation: what every collective phase put on every link, and for how long.

The flow network (:class:`moesim.timing.network.FlowNetwork`) records, per transfer (one
collective phase of one group of GPUs), the bytes it carried on each link and the span from
its start to its last arrival. A link's *utilisation during a phase* is those bytes over
``capacity * span``: 1.0 means the link was the phase's bottleneck and never idle; the
busiest link of an all-to-all sets its time. It can exceed 1 by a few percent: the network's
completion batching (``engine.flow_tolerance``) books flows finishing within a window at once,
and a phase arriving inside a window gets their capacity at once.

``links.parquet`` (one row per phase and link with traffic): ``phase`` (order of completion),
``start_s``, ``end_s``, ``link`` (name, e.g. ``gpu3->nvswitch0``), ``kind`` (nvlink, pcie,
pcie_host, nic, spine, ...), ``bytes``, ``utilisation``. The summary's ``links`` gives per kind
the bytes per step, the bytes-weighted mean and the peak utilisation, and the busiest link.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from moesim.hardware.topology import Topology
from moesim.timing.network import LinkRecord

COLUMNS = ("phase", "start_s", "end_s", "link", "kind", "bytes", "utilisation")


def links_table(topology: Topology, records: list[LinkRecord]) -> pd.DataFrame:
    """One row per (phase, link with traffic)."""
    if not records:
        return pd.DataFrame({c: [] for c in COLUMNS})
    sizes = [r.links.size for r in records]
    links = np.concatenate([r.links for r in records])
    nbytes = np.concatenate([r.nbytes for r in records])
    start = np.repeat([r.start for r in records], sizes)
    end = np.repeat([r.end for r in records], sizes)
    span = np.maximum(end - start, 1e-15)
    return pd.DataFrame(
        {
            "phase": np.repeat(np.arange(len(records), dtype=np.int32), sizes),
            "start_s": start,
            "end_s": end,
            "link": _categorical(np.asarray(topology.link_names), links),
            "kind": _categorical(np.asarray(topology.link_kind), links),
            "bytes": nbytes,
            "utilisation": nbytes / (topology.capacity[links] * span),
        }
    )


def _categorical(names: np.ndarray, ids: np.ndarray) -> pd.Categorical:
    """``pd.Categorical(names[ids])`` (the names used, sorted, as categories) from codes,
    without building a string per row."""
    used = np.unique(ids)
    categories, code_of_name = np.unique(names[used], return_inverse=True)
    code = np.full(names.size, -1, dtype=np.int32)
    code[used] = code_of_name
    return pd.Categorical.from_codes(code[ids], categories=categories)


def links_summary(table: pd.DataFrame, steps: int) -> dict[str, Any]:
    """Per link kind: bytes per step, mean (bytes-weighted) and peak utilisation; the busiest
    link (highest mean utilisation over the phases it carried)."""
    if table.empty:
        return {"by_kind": {}, "busiest_link": None}
    by_kind = {}
    for kind, g in table.groupby("kind", observed=True):
        w = g["bytes"].to_numpy()
        by_kind[str(kind)] = {
            "bytes_per_step": float(w.sum() / steps),
            "mean_utilisation": float(np.average(g["utilisation"], weights=w)),
            "peak_utilisation": float(g["utilisation"].max()),
        }
    per_link = table.groupby("link", observed=True)["utilisation"].mean()
    # links within float rounding of the highest (symmetric links tie) go by name, so that
    # the choice does not hang on the last bits of the fluid solver's arithmetic
    top = per_link[per_link >= per_link.max() * (1 - 1e-9)]
    busiest = str(min(top.index.astype(str)))
    return {
        "by_kind": by_kind,
        "busiest_link": {"link": busiest, "mean_utilisation": float(per_link.max())},
    }
