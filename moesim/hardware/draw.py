"""Drawing a cluster's network (plotly): GPUs, switches, host bridges, leaves and spine.

plotly is imported here only, so that code that never draws never loads it.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

from moesim.hardware.topology import Topology

TIERS = (("gpu", 0), ("nvswitch", 1), ("pcisw", 1), ("host", 2), ("leaf", 3), ("spine", 4))
COLORS = {"nvlink": "#54A24B", "pcie": "#9D755D", "nic": "#4C78A8", "spine": "#E45756"}


def _tier(node: str) -> int:
    for prefix, tier in TIERS:
        if node.startswith(prefix):
            return tier
    return 5


def topology_figure(topo: Topology) -> Any:
    """A figure of ``topo``: one marker per device, one line per link pair, coloured by kind;
    hovering a link shows its capacity and latency."""
    import plotly.graph_objects as go

    g = topo.graph()
    for node in g.nodes:
        g.nodes[node]["tier"] = _tier(node)
    pos = nx.multipartite_layout(g, subset_key="tier", align="horizontal")
    fig = go.Figure()
    seen: set[frozenset[str]] = set()
    for kind, colour in COLORS.items():
        xs: list[float | None] = []
        ys: list[float | None] = []
        for a, b, data in g.edges(data=True):
            pair = frozenset((a, b))
            if data["kind"] != kind or pair in seen:
                continue
            seen.add(pair)
            xs += [pos[a][0], pos[b][0], None]
            ys += [pos[a][1], pos[b][1], None]
        if xs:
            cap = next(d["capacity"] for _, _, d in g.edges(data=True) if d["kind"] == kind)
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines",
                    line={"color": colour},
                    name=f"{kind} ({cap / 1e9:.0f} GB/s usable per direction)",
                )
            )
    nodes = list(g.nodes)
    fig.add_trace(
        go.Scatter(
            x=[pos[n][0] for n in nodes],
            y=[pos[n][1] for n in nodes],
            mode="markers",
            marker={"size": 9, "color": [_tier(n) for n in nodes], "colorscale": "Viridis"},
            text=nodes,
            hoverinfo="text",
            name="devices",
        )
    )
    p = topo.profile
    fig.update_layout(
        title=f"{p.name}: {topo.nodes} node(s) x {p.node.gpus_per_node} "
        f"{p.gpu.model}, {p.node.interconnect}, {p.fabric.topology}",
        xaxis={"visible": False},
        yaxis={"visible": False},
    )
    return fig
