"""Routing generators fitted to real routing: to a trace, or to published per-expert counts.

The fitted generator is a chain over the fitted layers. At the first layer a token takes k
distinct experts, slot by slot, each with probability proportional to ``w`` among the experts it
has not taken (sampling without replacement, Plackett-Luce); at a later layer slot ``s`` weighs
expert ``j`` by ``w[j] T[i, j]``, where ``i`` is the expert the token took in slot ``s`` at the
layer before and ``T`` the measured cross-layer affinity ``P(j | i)``. The weights ``w`` are
then fitted (a fixed-point iteration on common random numbers) so that each expert's share of
choices equals the measured one: sampling without replacement flattens a skewed popularity, so
``w`` cannot simply be the measured shares. A layer is fitted twice: with the layer before (its
transitions concentrate the load, so ``w`` is flatter) and without it (``w_free``, for the first
layer of a chain and for a model layer that maps to the same fitted layer as the one before);
either way its marginal shares are the measured ones.

Sources:

- a moesim trace (``.parquet``): loads per recorded layer, affinity between consecutive
  recorded layers (slot-matched, as below);
- published counts (``.json`` in the format of ``olmoe-routing-stats``: ``expert_counts[domain]
  [layer]`` and ``crosslayer_counts[domain]["a-b"]``, the count of (expert at layer a, expert at
  layer b) for the same token and the same top-k slot). ``domain`` picks one; by default all
  domains are summed.

Model layers map onto fitted layers by relative depth (nearest fitted layer). Consecutive model
layers that map to the same fitted layer are drawn independently (the data says nothing about
their affinity).
"""

from __future__ import annotations

import functools
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moesim.traces.format import DenseRouting, Trace, TraceError, TraceMeta

FIT_TOKENS = 16384
FIT_ITERATIONS = 60
FIT_TOLERANCE = 0.01  # stop when every expert's share is within 1% of the measured one


@dataclass(frozen=True)
class FittedRouting:
    """A fitted routing model.

    Attributes:
        model: What it was fitted to.
        num_experts, top_k: Routing shape.
        num_layers: MoE layers of the source model.
        layer_ids: ``[F]`` source layers that were fitted.
        shares: ``[F, E]`` measured share of choices per expert (rows sum to 1).
        transitions: ``[F, E, E]`` ``P(j at layer f | i at layer f-1)`` (row 0 unused), or None
            where no affinity was measured.
        log_w: ``[F, E]`` fitted logits of a draw that follows the layer before (through
            ``transitions``).
        log_w_free: ``[F, E]`` fitted logits of a draw without the layer before: the first
            of a chain, and a model layer that maps to the same fitted layer as the one before
            it. The marginal shares of a layer drawn either way are ``shares``; the weights
            differ, because the conditioned draw's transitions already concentrate the load.
        source: Description of the data.
    """

    model: str
    num_experts: int
    top_k: int
    num_layers: int
    layer_ids: np.ndarray
    shares: np.ndarray
    transitions: list[np.ndarray | None]
    log_w: np.ndarray
    log_w_free: np.ndarray
    source: str

    def meta(self, source: str = "fit", capture: dict[str, Any] | None = None) -> TraceMeta:
        """The routing shape of the fit, as trace metadata."""
        return TraceMeta(
            model=self.model,
            num_experts=self.num_experts,
            top_k=self.top_k,
            num_layers=self.num_layers,
            source=source,
            capture=capture or {},
        )

    def sample(
        self,
        n: int,
        rng: np.random.Generator,
        layers: np.ndarray | None = None,
        prev: np.ndarray | None = None,
        prev_fitted: int | None = None,
    ) -> np.ndarray:
        """Draw ``[len(layers), n, top_k]`` experts for fitted-layer indices ``layers``.

        Args:
            n: Tokens.
            rng: The only source of randomness.
            layers: Fitted-layer index per generated layer (default: each fitted layer once).
            prev: ``[n, top_k]`` choices at the layer before ``layers[0]`` (to continue a
                chain across calls), and ``prev_fitted`` the fitted layer they were drawn at.
        """
        layers = np.arange(len(self.layer_ids)) if layers is None else np.asarray(layers)
        out = np.empty((len(layers), n, self.top_k), dtype=np.int16)
        last = prev_fitted
        for g, f in enumerate(layers):
            u = rng.random((self.top_k, n))
            t = self.transitions[f]
            if last == f - 1 and prev is not None and t is not None:
                out[g] = draw_layer(self.log_w[f], t, prev, u)
            else:
                out[g] = draw_layer(self.log_w_free[f], None, None, u)
            prev, last = out[g], int(f)
        return out


COMPILED_MIN_WEIGHTS = 1 << 22
"""Draws of at least this many (token, slot, expert) weights run compiled
(:mod:`moesim.traces._draw_jit`, the same picks); smaller ones in numpy, which then costs less
than loading numba."""


def draw_layer(
    log_w: np.ndarray, t: np.ndarray | None, prev: np.ndarray | None, u: np.ndarray
) -> np.ndarray:
    """``[n, k]`` distinct experts, slot by slot (sampling without replacement, Plackett-Luce).

    Slot ``s`` of a token picks expert ``j`` with probability proportional to ``exp(log_w[j])``,
    times ``T[prev[:, s], j] + 1e-6`` when the layer before is known (the published
    cross-layer counts pair the same slot at both layers), over the experts the token has not
    taken: the first expert whose running sum of weights exceeds ``u[s]`` (``[k, n]``
    uniforms) times the total. One uniform per choice, where Gumbel-max needs one per expert.
    """
    k, n = u.shape
    w = np.exp(log_w.astype(np.float64))
    tt = None if t is None or prev is None else (t + 1e-6).astype(np.float64)
    if n * k * len(w) >= COMPILED_MIN_WEIGHTS:
        from moesim.traces._draw_jit import draw_layer as compiled

        if tt is None or prev is None:
            return compiled(w, np.ones((1, 1)), np.zeros((1, k), np.int16), False, u)
        return compiled(w, tt, np.ascontiguousarray(prev), True, u)
    return draw_layer_numpy(w, tt, prev, u)


def draw_layer_numpy(
    w: np.ndarray, tt: np.ndarray | None, prev: np.ndarray | None, u: np.ndarray
) -> np.ndarray:
    """:func:`draw_layer` in numpy, from the weights ``w = exp(log_w)`` and ``tt = T + 1e-6``
    (None: unconditioned)."""
    k, n = u.shape
    out = np.empty((n, k), dtype=np.int16)
    taken = np.zeros((n, len(w)), dtype=bool)
    rows = np.arange(n)
    for s in range(k):
        weights = (
            np.broadcast_to(w, taken.shape) if tt is None or prev is None else w * tt[prev[:, s]]
        )
        cum = np.cumsum(np.where(taken, 0.0, weights), axis=1)
        total = cum[:, -1]
        x = np.minimum(u[s] * total, np.nextafter(total, 0.0))
        pick = (cum <= x[:, None]).sum(axis=1)
        out[:, s] = pick
        taken[rows, pick] = True
    return out


def _fit_layer(
    target: np.ndarray,
    t: np.ndarray | None,
    prev: np.ndarray | None,
    u: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``w`` so that the layer picks expert j with share ``target[j]``; and its draw."""
    e = len(target)
    goal = np.log(np.maximum(target, 1e-9))
    log_w = goal.copy()
    floor = 0.25 / u.size
    for _ in range(FIT_ITERATIONS):
        top = draw_layer(log_w, t, prev, u)
        got = np.bincount(top.ravel().astype(np.int64), minlength=e) / top.size
        err = goal - np.log(np.maximum(got, floor))
        if np.abs(err[target > 20 * floor]).max(initial=0.0) < FIT_TOLERANCE:
            break
        log_w += 0.7 * err
        log_w -= log_w.max()
    return log_w, draw_layer(log_w, t, prev, u)


def fit_routing(
    model: str,
    num_experts: int,
    top_k: int,
    num_layers: int,
    layer_ids: np.ndarray,
    counts: np.ndarray,
    transitions: list[np.ndarray | None],
    source: str,
    seed: int = 0,
) -> FittedRouting:
    """Fit the chain to per-layer counts ``[F, E]`` and transitions (see the module docstring)."""
    rng = np.random.default_rng(seed)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    log_w = np.zeros(shares.shape)
    log_w_free = np.zeros(shares.shape)
    prev: np.ndarray | None = None
    tokens = max(1024, FIT_TOKENS * 64 // max(num_experts, 64))
    for f in range(len(layer_ids)):
        u = rng.random((top_k, tokens))
        log_w_free[f], free = _fit_layer(shares[f], None, None, u)
        if prev is not None and transitions[f] is not None:
            log_w[f], prev = _fit_layer(shares[f], transitions[f], prev, u)
        else:
            log_w[f], prev = log_w_free[f], free
    return FittedRouting(
        model=model,
        num_experts=num_experts,
        top_k=top_k,
        num_layers=num_layers,
        layer_ids=np.asarray(layer_ids),
        shares=shares,
        transitions=transitions,
        log_w=log_w,
        log_w_free=log_w_free,
        source=source,
    )


def _normalise_rows(co: np.ndarray) -> np.ndarray:
    row = co.sum(axis=1, keepdims=True)
    return np.divide(co, row, out=np.full_like(co, 1.0 / co.shape[1]), where=row > 0)


def fit_trace(trace: Trace, seed: int = 0) -> FittedRouting:
    """Fit to a trace: loads per recorded layer, slot-matched affinity between them."""
    from moesim.traces.stats import load_counts

    layers, counts = load_counts(trace)
    dense = trace.dense()
    e = trace.meta.num_experts
    transitions: list[np.ndarray | None] = [None]
    for i in range(1, len(layers)):
        transitions.append(_normalise_rows(_slot_matched(dense, i - 1, i, e)))
    m = trace.meta
    return fit_routing(
        m.model,
        e,
        m.top_k,
        m.num_layers,
        layers,
        counts.astype(np.float64),
        transitions,
        f"trace of {m.model} ({m.source})",
        seed,
    )


def fit_counts(path: str | Path, domain: str | None = None, seed: int = 0) -> FittedRouting:
    """Fit to published counts (``olmoe-routing-stats`` JSON format).

    Raises:
        TraceError: the file is unreadable or not in that format (named field and why).
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise TraceError(path, f"cannot read counts JSON: {e}") from None
    if not isinstance(raw, dict):
        raise TraceError(path, f"counts JSON must be an object, got {type(raw).__name__}")
    for key in ("num_experts", "top_k", "num_layers", "expert_counts"):
        if key not in raw:
            raise TraceError(path, f"counts JSON without '{key}'")
    try:
        meta = TraceMeta(
            str(raw.get("model", path.stem)),
            raw["num_experts"],
            raw["top_k"],
            raw["num_layers"],
            "fit",
        )
        return _fit_counts(raw, meta, path, domain, seed)
    except TraceError as e:
        raise TraceError(path, str(e)) from None
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise TraceError(path, f"malformed counts JSON: {type(e).__name__}: {e}") from None


def _fit_counts(
    raw: dict[str, Any], meta: TraceMeta, path: Path, domain: str | None, seed: int
) -> FittedRouting:
    e = meta.num_experts
    by_domain: dict[str, dict[str, list[int]]] = raw["expert_counts"]
    domains = sorted(by_domain) if domain is None else [domain]
    if domain is not None and domain not in by_domain:
        raise TraceError(None, f"no domain '{domain}'; valid: {', '.join(sorted(by_domain))}")
    if not domains:
        raise TraceError(None, "expert_counts holds no domain")
    layer_keys = sorted(by_domain[domains[0]], key=int)
    layer_ids = np.array([int(x) for x in layer_keys])
    if not layer_keys or layer_ids.min() < 0 or layer_ids.max() >= meta.num_layers:
        raise TraceError(None, f"expert_counts layers must lie in 0..{meta.num_layers - 1}")
    counts = np.array(
        [np.sum([by_domain[d][lk] for d in domains], axis=0) for lk in layer_keys], dtype=float
    )
    if counts.shape != (len(layer_keys), e) or not np.isfinite(counts).all() or (counts < 0).any():
        raise TraceError(
            None, f"expert_counts must hold {e} non-negative counts per layer, got {counts.shape}"
        )
    cross = raw.get("crosslayer_counts", {})
    transitions: list[np.ndarray | None] = [None]
    for a, b in itertools.pairwise(layer_keys):
        mats = [cross[d][f"{a}-{b}"] for d in domains if f"{a}-{b}" in cross.get(d, {})]
        mat = np.sum(mats, axis=0).astype(float) if len(mats) == len(domains) else None
        if mat is not None and (mat.shape != (e, e) or not np.isfinite(mat).all()):
            raise TraceError(None, f"crosslayer_counts {a}-{b} must be {e} x {e} counts")
        transitions.append(None if mat is None else _normalise_rows(mat))
    label = f"counts {path.name}" + (f" domain {domain}" if domain else " (all domains)")
    return fit_routing(
        meta.model, e, meta.top_k, meta.num_layers, layer_ids, counts, transitions, label, seed
    )


def load_fit(path: str | Path, domain: str | None = None, seed: int = 0) -> FittedRouting:
    """Fit to ``path``: a moesim trace (``.parquet``) or published counts (``.json``).

    A fit takes seconds and depends only on the file, the domain and the seed, so the fits of
    the last few files are kept for the process (a sweep fits once), keyed by the file's
    modification time and size too; their arrays are read-only.
    """
    path = Path(path)
    try:
        full = path.resolve()
        st = full.stat()
    except OSError:
        return _load_fit(path, domain, seed)  # the reader names what is wrong
    return _cached_fit(str(full), st.st_mtime_ns, st.st_size, domain, seed)


@functools.lru_cache(maxsize=8)
def _cached_fit(
    path: str, _mtime_ns: int, _size: int, domain: str | None, seed: int
) -> FittedRouting:
    fit = _load_fit(Path(path), domain, seed)
    for arr in (
        fit.layer_ids,
        fit.shares,
        fit.log_w,
        fit.log_w_free,
        *(t for t in fit.transitions if t is not None),
    ):
        arr.setflags(write=False)
    return fit


def _load_fit(path: Path, domain: str | None, seed: int) -> FittedRouting:
    if path.suffix == ".json":
        return fit_counts(path, domain, seed)
    from moesim.traces.format import read_trace

    return fit_trace(read_trace(path), seed)


def synthesize(fit: FittedRouting, tokens: int, seq_len: int, seed: int) -> Trace:
    """A trace of ``tokens`` tokens drawn from ``fit`` (its fitted layers, step 0)."""
    meta = fit.meta("synthetic", {"generator": "fitted", "fitted_to": fit.source, "seed": seed})
    experts = fit.sample(tokens, np.random.default_rng(seed))
    return Trace.from_layers(meta, experts, fit.layer_ids, seq_len)


def sorted_load_tv(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance between the sorted (descending) load shares of ``a`` and ``b``."""
    pa = np.sort(a / a.sum())[::-1]
    pb = np.sort(b / b.sum())[::-1]
    return float(0.5 * np.abs(pa - pb).sum())


def slot_matched_counts(trace: Trace, layer_a: int, layer_b: int) -> np.ndarray:
    """``[E, E]`` count of (expert at ``layer_a``, expert at ``layer_b``), same token and slot.

    The measure of ``crosslayer_counts`` in the published OLMoE / Mixtral data.
    """
    dense = trace.dense()
    ia, ib = np.searchsorted(dense.layers, [layer_a, layer_b])
    return _slot_matched(dense, int(ia), int(ib), trace.meta.num_experts)


def _slot_matched(dense: DenseRouting, ia: int, ib: int, e: int) -> np.ndarray:
    a, b = dense.experts[ia], dense.experts[ib]
    ok = (a >= 0).all(axis=1) & (b >= 0).all(axis=1)
    pairs = (a[ok].astype(np.int64) * e + b[ok]).ravel()
    return np.bincount(pairs, minlength=e * e).reshape(e, e).astype(np.float64)


def affinity_tv(real: np.ndarray, other: np.ndarray) -> float:
    """Mean total-variation distance between the rows ``P(. | i)`` of two co-count matrices.

    Rows are weighted by how often ``i`` occurs in ``real``.
    """
    pr, po = _normalise_rows(real.astype(float)), _normalise_rows(other.astype(float))
    w = real.sum(axis=1) / real.sum()
    return float(w @ (0.5 * np.abs(pr - po).sum(axis=1)))
