"""Statistics of a routing trace: load balance per layer, cross-layer affinity, reuse.

Per layer (loads count every choice the router made, dropped or not):

- ``max_over_mean``: busiest expert's load over the mean load (1.0 is perfect balance);
- ``cv``: coefficient of variation of the loads; ``gini``: Gini coefficient (0 balanced,
  1 - 1/E when one expert takes everything);
- ``entropy``: entropy of the load distribution over ``log2(E)`` (1.0 is uniform);
- ``aux_loss``: the Switch Transformer load-balancing loss ``E * sum_i f_i * P_i`` (f_i: share of
  assignments, P_i: mean router probability), 1.0 at perfect balance. P_i comes from the softmax
  of the logits when the trace has them, else from the gate weights (``aux_loss_from`` says which);
- ``diversity``: distinct expert sets used over ``min(tokens, C(E, k))``;
- ``step_reuse``: share of the experts active in a step that were active in the step before
  (what an expert cache in decode sees); ``token_reuse``: share of a token's experts that its
  sequence's previous token also chose;
- ``drop_rate``: share of choices the router dropped (Switch Transformers' capacity).

Cross-layer affinity between consecutive recorded layers: ``P(j at l' | i at l)`` for the same
token; ``top1_conditional`` is the mean over i of ``max_j P(j | i)``, and ``dependence`` the
total-variation distance between ``P(. | i) / k`` and the unconditional shares at ``l'``,
averaged over i weighted by its load (0 when the layers are independent, up to 1).
"""

from __future__ import annotations

from math import comb, log2
from typing import Any

import numpy as np

from moesim.traces.format import DenseRouting, Trace


def load_counts(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """``(layers present, [L, E] assignments per expert)``."""
    layers = trace.layers()
    slot = np.searchsorted(layers, trace.layer)
    e = trace.meta.num_experts
    flat = (slot[:, None].astype(np.int64) * e + trace.experts).ravel()
    counts = np.bincount(flat, minlength=len(layers) * e).reshape(len(layers), e)
    return layers, counts


def gini(x: np.ndarray) -> float:
    """Gini coefficient of non-negative values."""
    s = np.sort(np.asarray(x, dtype=np.float64))
    n, total = len(s), s.sum()
    if total == 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ s / (n * total))


def balance(counts: np.ndarray) -> dict[str, float]:
    """max/mean, CV, Gini and normalised entropy of one layer's loads."""
    mean = counts.mean()
    p = counts / max(counts.sum(), 1)
    nz = p[p > 0]
    return {
        "max_over_mean": float(counts.max() / mean) if mean else 0.0,
        "cv": float(counts.std() / mean) if mean else 0.0,
        "gini": gini(counts),
        "entropy": float(-(nz * np.log2(nz)).sum() / log2(len(counts))),
    }


def _aux_loss(trace: Trace, rows: np.ndarray, counts: np.ndarray) -> tuple[float, str]:
    e = trace.meta.num_experts
    f = counts / max(counts.sum(), 1)
    if trace.logits is not None:
        z = trace.logits[rows].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        pr = np.exp(z)
        pr /= pr.sum(axis=1, keepdims=True)
        return float(e * f @ pr.mean(axis=0)), "logits"
    if trace.weights is None:
        return float("nan"), "none"
    w = trace.weights[rows].astype(np.float64)
    w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-30)
    p = np.bincount(trace.experts[rows].ravel(), weights=w.ravel(), minlength=e) / len(rows)
    return float(e * f @ p), "gate weights"


def _step_reuse(dense: DenseRouting, li: int, e: int) -> float:
    steps = dense.keys[:, 0]
    uniq = np.unique(steps)
    if len(uniq) < 2:
        return float("nan")
    ex = dense.experts[li]
    ok = ex >= 0
    step_idx = np.searchsorted(uniq, np.broadcast_to(steps[:, None], ex.shape)[ok])
    active = np.zeros((len(uniq), e), dtype=bool)
    active[step_idx, ex[ok]] = True
    inter = (active[1:] & active[:-1]).sum(axis=1)
    now = active[1:].sum(axis=1)
    return float(inter.sum() / max(now.sum(), 1))


def _token_reuse(dense: DenseRouting, li: int) -> float:
    k = dense.keys
    prev_same = (k[1:, 0] == k[:-1, 0]) & (k[1:, 1] == k[:-1, 1]) & (k[1:, 2] == k[:-1, 2] + 1)
    ex = dense.experts[li]
    a, b = ex[1:][prev_same], ex[:-1][prev_same]
    valid = (a >= 0).all(axis=1) & (b >= 0).all(axis=1)
    a, b = a[valid], b[valid]
    if not len(a):
        return float("nan")
    hits = (a[:, :, None] == b[:, None, :]).any(axis=2).sum()
    return float(hits / a.size)


def pair_counts(a: np.ndarray, b: np.ndarray, e: int) -> np.ndarray:
    """``[E, E]`` count of tokens choosing expert ``x`` in ``a`` and ``y`` in ``b``.

    Args:
        a, b: ``[n, k]`` expert ids of the same tokens (negative ids are ignored per token).
    """
    ok = (a >= 0).all(axis=1) & (b >= 0).all(axis=1)
    a, b = a[ok].astype(np.int64), b[ok].astype(np.int64)
    pairs = (a[:, :, None] * e + b[:, None, :]).ravel()
    return np.bincount(pairs, minlength=e * e).reshape(e, e).astype(np.float64)


def affinity(dense: DenseRouting, i: int, j: int, e: int) -> np.ndarray:
    """``[E, E]`` P(expert b chosen at layer slot j | expert a chosen at layer slot i).

    Same token; each row sums to top_k (a token chooses k experts at the later layer).
    """
    a, b = dense.experts[i], dense.experts[j]
    co = pair_counts(a, b, e)
    ok = (a >= 0).all(axis=1) & (b >= 0).all(axis=1)
    n_a = np.bincount(a[ok].ravel().astype(np.int64), minlength=e).astype(np.float64)[:, None]
    return np.divide(co, n_a, out=np.zeros_like(co), where=n_a > 0)


def trace_stats(trace: Trace) -> dict[str, Any]:
    """All statistics of ``trace`` (JSON-ready; see the module docstring)."""
    m = trace.meta
    e, k = m.num_experts, m.top_k
    dense = trace.dense()
    layers, counts = load_counts(trace)
    per_layer = []
    for li, layer in enumerate(layers):
        rows = np.nonzero(trace.layer == layer)[0]
        aux, aux_from = _aux_loss(trace, rows, counts[li])
        ex = dense.experts[li]
        valid = ex[(ex >= 0).all(axis=1)]
        distinct = len(np.unique(np.sort(valid, axis=1), axis=0)) if len(valid) else 0
        per_layer.append(
            {
                "layer": int(layer),
                "tokens": len(rows),
                **balance(counts[li]),
                "aux_loss": aux,
                "aux_loss_from": aux_from,
                "experts_used": int((counts[li] > 0).sum()),
                "diversity": distinct / max(1, min(len(valid), comb(e, k))),
                "step_reuse": _step_reuse(dense, li, e),
                "token_reuse": _token_reuse(dense, li),
                "drop_rate": float(trace.dropped[rows].mean())
                if trace.dropped is not None
                else 0.0,
                "loads": counts[li].tolist(),
            }
        )
    pairs = []
    for i in range(len(layers) - 1):
        p = affinity(dense, i, i + 1, e)
        marginal = counts[i + 1] / max(counts[i + 1].sum(), 1)  # share of choices
        n_i = counts[i].astype(np.float64)
        used = n_i > 0
        best = p.max(axis=1)
        dependence = 0.5 * np.abs(p / k - marginal[None, :]).sum(axis=1)
        pairs.append(
            {
                "from": int(layers[i]),
                "to": int(layers[i + 1]),
                "top1_conditional": float(best[used].mean()) if used.any() else 0.0,
                "dependence": float(n_i @ dependence / n_i.sum()) if used.any() else 0.0,
                "matrix": p.round(6).tolist(),
            }
        )
    keys = dense.keys
    return {
        "trace": {
            "model": m.model,
            "source": m.source,
            "num_experts": e,
            "top_k": k,
            "num_layers": m.num_layers,
            "layers_present": [int(x) for x in layers],
            "tokens": len(keys),
            "steps": len(np.unique(keys[:, 0])),
            "sequences": len(np.unique(keys[:, 1])),
            "assignments": trace.assignments,
        },
        "layers": per_layer,
        "affinity": pairs,
        "overall": {
            name: float(np.nanmean([row[name] for row in per_layer]))
            for name in (
                "max_over_mean",
                "cv",
                "gini",
                "entropy",
                "aux_loss",
                "diversity",
                "step_reuse",
                "token_reuse",
                "drop_rate",
            )
            if not all(np.isnan(row[name]) for row in per_layer)
        },
    }


def stats_figure(stats: dict[str, Any]) -> Any:
    """A plotly figure: load heatmap (layers x experts, load / mean) and the first affinity map."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers = stats["layers"]
    loads = np.array([row["loads"] for row in layers], dtype=np.float64)
    rel = loads / np.maximum(loads.mean(axis=1, keepdims=True), 1e-12)
    aff = stats["affinity"]
    fig = make_subplots(
        rows=1,
        cols=2 if aff else 1,
        subplot_titles=(
            "expert load / mean load",
            *(
                [f"affinity P(expert at layer {aff[0]['to']} | expert at layer {aff[0]['from']})"]
                if aff
                else []
            ),
        ),
    )
    fig.add_trace(
        go.Heatmap(
            z=rel,
            y=[f"L{row['layer']}" for row in layers],
            colorscale="Viridis",
            colorbar={"title": "load/mean", "x": 0.45 if aff else 1.0},
            hovertemplate="layer %{y} expert %{x}: %{z:.2f} x mean<extra></extra>",
        ),
        row=1,
        col=1,
    )
    if aff:
        fig.add_trace(
            go.Heatmap(
                z=aff[0]["matrix"],
                colorscale="Magma",
                hovertemplate="from %{y} to %{x}: %{z:.3f}<extra></extra>",
            ),
            row=1,
            col=2,
        )
        fig.update_xaxes(title_text=f"expert at layer {aff[0]['to']}", row=1, col=2)
        fig.update_yaxes(title_text=f"expert at layer {aff[0]['from']}", row=1, col=2)
    fig.update_xaxes(title_text="expert", row=1, col=1)
    t = stats["trace"]
    fig.update_layout(
        title=f"Routing of {t['model']} ({t['source']}, {t['tokens']} tokens, "
        f"{t['num_experts']} experts, top-{t['top_k']})",
        height=520,
    )
    return fig
