"""Routing from real runs: replay a trace, or draw from a generator fitted to one.

Replay (``routing: {source: trace, path: ...}``): every simulated sequence is given a whole
trace sequence, sampled with the routing stage's seed without replacement until the trace's
sequences are used up (then again, reshuffled), preferring sequences at least as long as the
batch needs. Simulated position ``p`` reads that sequence's ``p``-th recorded token (modulo its
length), so positions, and drops by position, are the trace's own. Decode keeps a sequence
from step to step; prefill and training take new sequences every step.

``trace_steps: [first, last]`` replays only those steps of the trace.

Layers: with ``layer_map: exact`` the trace must be of a model with as many MoE layers as the
simulated one (a trace that recorded only some layers, like a vLLM log of 5 of 24, serves the
others from the nearest recorded layer); ``stretch`` maps layers by relative depth, e.g. a
4-layer trace onto a 32-layer model. Experts and top-k must match the model.
"""

from __future__ import annotations

import numpy as np

from moesim.config.scenario import Routing
from moesim.errors import ConfigError
from moesim.models.spec import ModelSpec
from moesim.routing.batch import TokenBatch
from moesim.routing.sources import RoutingDraw
from moesim.traces.fit import FittedRouting, load_fit
from moesim.traces.format import TraceError, TraceMeta
from moesim.traces.stats import load_counts


def trace_mismatch(meta: TraceMeta, model: ModelSpec, layer_map: str) -> str | None:
    """Why a trace (or fit) of ``meta``'s shape cannot drive ``model``, or None."""
    moe = model.moe
    if meta.num_experts != moe.num_experts:
        return (
            f"the trace has {meta.num_experts} experts per layer ({meta.model}), "
            f"model {model.name} has {moe.num_experts}"
        )
    if meta.top_k != moe.top_k:
        return (
            f"the trace routes each token to {meta.top_k} experts, "
            f"model {model.name} to {moe.top_k}"
        )
    layers = len(model.moe_layers)
    if layer_map == "exact" and meta.num_layers != layers:
        return (
            f"the trace is of a model with {meta.num_layers} MoE layers, {model.name} has "
            f"{layers}; set routing.layer_map: stretch to map layers by relative depth"
        )
    return None


def map_layers(
    model_layers: int, trace_layers: int, present: np.ndarray, layer_map: str
) -> np.ndarray:
    """``[model_layers]`` index into ``present`` (the recorded trace layers), per model layer."""
    if layer_map == "stretch" and model_layers > 1:
        target = np.rint(np.arange(model_layers) * (trace_layers - 1) / (model_layers - 1))
    else:
        target = np.arange(model_layers, dtype=np.float64)
    return np.abs(target[:, None] - present[None, :].astype(np.float64)).argmin(axis=1)


class TraceSource:
    """Replays a routing trace (see the module docstring)."""

    def __init__(self, cfg: Routing, model: ModelSpec, rng: np.random.Generator) -> None:
        from moesim.traces.format import read_trace

        assert cfg.path is not None
        trace = read_trace(cfg.path)
        why = trace_mismatch(trace.meta, model, cfg.layer_map)
        if why:
            raise TraceError(cfg.path, why)
        if cfg.trace_steps is not None:
            first, last = cfg.trace_steps
            trace = trace.select((trace.step >= first) & (trace.step <= last))
            if not trace.rows:
                raise TraceError(cfg.path, f"no rows with step in [{first}, {last}]")
        dense = trace.dense()
        order = np.lexsort((dense.keys[:, 2], dense.keys[:, 1]))
        seq_of = dense.keys[order, 1]
        _, self.start, self.length = np.unique(seq_of, return_index=True, return_counts=True)
        self.layer_idx = map_layers(
            len(model.moe_layers), trace.meta.num_layers, dense.layers, cfg.layer_map
        )
        used = np.unique(self.layer_idx)
        self.experts = dense.experts[:, order]
        if (self.experts[used] < 0).any():
            raise TraceError(
                cfg.path, "some tokens have no routing at some recorded layers; cannot replay"
            )
        self.weights = None if dense.weights is None else dense.weights[:, order]
        self.logits = None if dense.logits is None else dense.logits[:, order]
        # recorded router logits give rerouting the router's own next choices
        self.records_scores = self.logits is not None
        self.path = cfg.path
        _, counts = load_counts(trace)  # per recorded layer, in dense.layers order
        self.loads = (counts / counts.sum(axis=1, keepdims=True))[self.layer_idx]
        self.top_k = trace.meta.top_k
        self.rng = np.random.default_rng(rng.integers(1 << 62))
        self.assigned: dict[int, int] = {}
        self.queue: list[int] = []

    def expected_loads(self) -> np.ndarray:
        """``[moe_layers, experts]`` share of choices in the trace layer each model layer reads."""
        return self.loads

    def _trace_seqs(self, seq_ids: np.ndarray, needed: int) -> np.ndarray:
        new = [int(s) for s in np.unique(seq_ids) if int(s) not in self.assigned]
        for s in new:
            if not self.queue:
                long = np.nonzero(self.length >= needed)[0]
                pool = long if len(long) else np.arange(len(self.length))
                self.queue = list(self.rng.permutation(pool))
            self.assigned[s] = int(self.queue.pop())
        lookup = np.vectorize(self.assigned.__getitem__, otypes=[np.int64])
        return lookup(seq_ids)

    def _tokens(self, batch: TokenBatch) -> np.ndarray:
        """``[ranks, tokens]`` trace token of each token of ``batch``."""
        uniq, inv = np.unique(batch.seq_id, return_inverse=True)
        ts = self._trace_seqs(uniq, int(batch.position.max()) + 1)[inv.reshape(batch.seq_id.shape)]
        return np.asarray(self.start[ts] + batch.position % self.length[ts])

    def scores(
        self, step: int, layers: np.ndarray, batch: TokenBatch, rng: np.random.Generator
    ) -> np.ndarray:
        """``[L, ranks, tokens, E]`` the recorded router logits of the batch's tokens."""
        if self.logits is None:
            raise TraceError(
                self.path,
                "re-gating needs router logits and this trace has none (capture with --logits)",
            )
        return np.asarray(self.logits[self.layer_idx[layers]][:, self._tokens(batch)])

    def draw(
        self,
        step: int,
        layers: np.ndarray,
        batch: TokenBatch,
        rng: np.random.Generator,
        with_weights: bool,
    ) -> RoutingDraw:
        """The trace's routing of the tokens of ``batch`` (``rng`` is not used)."""
        token = self._tokens(batch)
        li = self.layer_idx[layers]
        experts = self.experts[li][:, token]
        if not with_weights:
            return RoutingDraw(experts=experts, weights=None)
        if self.weights is None:
            w = np.full(experts.shape, 1.0 / self.top_k)
        else:
            w = self.weights[li][:, token].astype(np.float64)
            w /= np.maximum(w.sum(axis=-1, keepdims=True), 1e-30)
        return RoutingDraw(experts=experts, weights=w)


class FittedSource:
    """Draws from a generator fitted to a trace or to published counts."""

    records_scores = False

    def scores(
        self, step: int, layers: np.ndarray, batch: TokenBatch, rng: np.random.Generator
    ) -> np.ndarray:
        """A fitted generator has no router scores: re-gating cannot use it."""
        raise ConfigError(
            None,
            "policies.gating.type",
            "re-gating needs router scores, which the fitted generator does not give "
            "(use gating source, or a trace captured with logits)",
        )

    def __init__(self, cfg: Routing, model: ModelSpec, rng: np.random.Generator) -> None:
        assert cfg.fit is not None
        self.fit: FittedRouting = load_fit(cfg.fit, cfg.domain)
        why = trace_mismatch(self.fit.meta(), model, cfg.layer_map)
        if why:
            raise TraceError(cfg.fit, why)
        self.layer_idx = map_layers(
            len(model.moe_layers), self.fit.num_layers, self.fit.layer_ids, cfg.layer_map
        )
        self._last: tuple[int, int, np.ndarray] | None = None

    def expected_loads(self) -> np.ndarray:
        """``[moe_layers, experts]`` measured shares of the fitted layer each model layer uses."""
        return self.fit.shares[self.layer_idx]

    def draw(
        self,
        step: int,
        layers: np.ndarray,
        batch: TokenBatch,
        rng: np.random.Generator,
        with_weights: bool,
    ) -> RoutingDraw:
        """Draw a chain over ``layers``, continuing the previous chunk of the same step."""
        n = batch.ranks * batch.tokens_per_rank
        prev, prev_fitted = None, None
        if self._last is not None and self._last[0] == step and self._last[1] == layers[0] - 1:
            prev = self._last[2]
            prev_fitted = int(self.layer_idx[layers[0] - 1])
        if prev is not None and len(prev) != n:
            prev, prev_fitted = None, None
        fitted = self.layer_idx[layers]
        experts = self.fit.sample(n, rng, fitted, prev, prev_fitted)
        self._last = (step, int(layers[-1]), experts[-1])
        shape = (len(layers), batch.ranks, batch.tokens_per_rank, self.fit.top_k)
        if not with_weights:
            return RoutingDraw(experts=experts.reshape(shape), weights=None)
        w = np.exp(
            np.take_along_axis(self.fit.log_w_free[fitted][:, None, :], experts.astype(np.intp), 2)
        )
        w /= w.sum(axis=-1, keepdims=True)
        return RoutingDraw(experts=experts.reshape(shape), weights=w.reshape(shape))
