"""The routing stage: per step, every replica's MoE-layer counts, computed on arrays.

Work proportional to tokens happens here, in numpy, a chunk of layers at a time (a chunk holds
at most :data:`CHUNK_ASSIGNMENTS` assignments so memory stays bounded for 64-GPU prefills).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from moesim.comm.alltoall import ALL_TO_ALL
from moesim.config.scenario import Scenario
from moesim.models.spec import ModelSpec, slots_per_rank
from moesim.policies.gating import GATINGS, GateContext
from moesim.policies.placement import PLACEMENTS, Placement, PlacementInput, make_placement
from moesim.policies.replicas import REPLICA_CHOICES
from moesim.routing.batch import TokenBatch, make_batch
from moesim.routing.catalog import SOURCES
from moesim.routing.dispatch import CapacityRule, LayerCounts, count_layers
from moesim.routing.sources import (
    RoutingDraw,
    RoutingSource,
    next_choices,
    next_choices_by_score,
)

CHUNK_ASSIGNMENTS = 1 << 24


@dataclass(frozen=True)
class StepRouting:
    """One step's routing outcome: ``replicas[r]`` holds the counts of replica ``r``.

    Every array in a :class:`LayerCounts` has the MoE layers as its first axis.
    ``migration`` is ``[ranks, ranks]`` expert bytes (per tensor-parallel GPU) moved from rank
    ``s`` to rank ``d`` before the step when the placement changed, else None. ``aux_loss`` is
    ``[moe_layers]`` the re-gating's load-balancing loss (None without re-gating). With
    two-batch overlap, ``micro`` holds each micro-batch's own routing (its tokens, counts and
    capacity) and ``replicas`` their sums. ``placement`` is the placement the step ran on.
    """

    batch: TokenBatch
    replicas: list[LayerCounts]
    migration: np.ndarray | None = None
    bins: int = 1
    aux_loss: np.ndarray | None = None
    micro: tuple[StepRouting, ...] = ()
    placement: Placement | None = None


COACTIVATION_TOKENS = 8192


class RoutingStage:
    """Draws and counts the routing of each step of a scenario.

    Args:
        scenario: The validated scenario.
        model: Its model.
        gpus_per_node: From the hardware profile.
        rng: The routing stage's random generator.
    """

    def __init__(
        self, scenario: Scenario, model: ModelSpec, gpus_per_node: int, rng: np.random.Generator
    ) -> None:
        self.scenario, self.model, self.rng = scenario, model, rng
        par = scenario.parallelism
        self.source: RoutingSource = SOURCES.get(scenario.routing.source)(
            scenario.routing, model, rng
        )
        self.rank_node = np.array(par.rank_nodes(gpus_per_node))
        # tokens per destination rank and node, counted where the all-to-all reads them
        self.copies = ALL_TO_ALL.get(scenario.policies.all_to_all.type).reads_copies
        pcfg = scenario.policies.placement
        experts = model.moe.num_experts
        self.slots_per_rank = slots_per_rank(experts, pcfg.redundant_experts, par.ep)
        self._coact: tuple[np.ndarray, np.ndarray] | None = None
        self.loads = self.source.expected_loads()
        self._set_placement(self.loads)
        cap = scenario.policies.capacity
        self.rule = CapacityRule(
            factor=cap.factor if cap.type == "capacity" else None,
            drop=cap.drop,
            num_experts=experts,
            top_k=model.moe.top_k,
            scope=cap.scope,
            pad=cap.pad,
            reroute_depth=cap.reroute_depth,
        )
        w = scenario.workload
        self.bins = min(w.seq_len, 32) if w.mode != "decode" else 1
        gating = scenario.policies.gating.type
        self.gate = GATINGS.get(gating)
        # gates that balance by construction take no capacity drops
        self.step_rule = replace(self.rule, factor=None) if self.gate.balances else self.rule
        moe = model.moe
        self.gate_ctx = lambda batch: GateContext(
            top_k=moe.top_k,
            n_group=moe.n_group or 1,
            topk_group=moe.topk_group or 1,
            factor=cap.factor or 1.0,
            seq_id=batch.seq_id.ravel(),
        )
        self.ema: np.ndarray | None = None
        self.micro_batches = scenario.policies.overlap.micro_batches

    def _placement_input(self, loads: np.ndarray) -> PlacementInput:
        pcfg, moe = self.scenario.policies.placement, self.model.moe
        return PlacementInput(
            loads=np.asarray(loads, dtype=np.float64),
            ranks=self.scenario.parallelism.ep,
            slots_per_rank=self.slots_per_rank,
            rank_node=self.rank_node,
            num_groups=pcfg.num_groups or moe.n_group or 1,
            coactivation=self.coactivation,
        )

    def _set_placement(self, loads: np.ndarray) -> None:
        pcfg = self.scenario.policies.placement
        self.placement: Placement = make_placement(pcfg.type, self._placement_input(loads))
        choice = pcfg.replica_choice or PLACEMENTS.get(pcfg.type).replica_choice
        self.chooser = REPLICA_CHOICES.get(choice)(
            self.placement, self.model.moe.num_experts, self.rank_node
        )

    def coactivation(self) -> tuple[np.ndarray, np.ndarray]:
        """``(co [L, E, E], next [L-1, E, E])`` counts from a sample of the source's routing.

        The sample (:data:`COACTIVATION_TOKENS` tokens of step 0) uses its own generator, so
        the simulated steps draw the same routing whatever the placement.
        """
        if self._coact is not None:
            return self._coact
        from moesim.traces.stats import pair_counts

        w, e = self.scenario.workload, self.model.moe.num_experts
        if w.mode == "decode":
            batch = make_batch(1, COACTIVATION_TOKENS, 1, w.context_len)
        else:
            per = min(w.seq_len, COACTIVATION_TOKENS)
            batch = make_batch(1, max(1, COACTIVATION_TOKENS // per), per, 0)
        rng = np.random.default_rng(np.random.SeedSequence([self.scenario.seed, 1]))
        n_moe = len(self.model.moe_layers)
        experts = self.source.draw(0, np.arange(n_moe), batch, rng, False).experts
        x = experts.reshape(n_moe, -1, experts.shape[-1])
        co = np.stack([pair_counts(x[i], x[i], e) for i in range(n_moe)])
        co[:, np.arange(e), np.arange(e)] = 0
        nxt = (
            np.stack([pair_counts(x[i], x[i + 1], e) for i in range(n_moe - 1)])
            if n_moe > 1
            else np.zeros((0, e, e))
        )
        self._coact = (co, nxt)
        return self._coact

    def batch(self, step: int, replica: int = 0) -> TokenBatch:
        """The tokens of ``step`` on each EP rank of data-parallel replica ``replica``.

        Sequence ids are global: decode keeps a replica's sequences from step to step, prefill
        and training take new sequences every step.
        """
        w, par = self.scenario.workload, self.scenario.parallelism
        seqs = w.batch_size // par.ep
        if w.mode == "decode":
            return make_batch(par.ep, seqs, 1, w.context_len + step, replica * w.batch_size)
        first = (step * par.dp + replica) * w.batch_size
        return make_batch(par.ep, seqs, w.seq_len, 0, first)

    def _rebalance(self, step: int) -> np.ndarray | None:
        """Re-place from the moving average of loads when due; the bytes moved, else None."""
        every = self.scenario.policies.placement.rebalance_every_steps
        if not every or step == 0 or step % every or self.ema is None:
            return None
        old = self.placement
        self._set_placement(self.ema)
        if self.scenario.policies.offload.enabled:
            return None  # experts live in host memory: a rank's new ones are cache misses
        moved = migration_bytes(old, self.placement, self.rank_node, self.expert_bytes)
        return moved if moved.any() else None

    @property
    def expert_bytes(self) -> float:
        """Bytes of one expert's weights on one tensor-parallel GPU."""
        return self.model.expert_bytes(self.scenario.workload.dtype, self.scenario.parallelism.tp)

    def step(self, step: int) -> StepRouting:
        """Draw and count step ``step`` for every replica."""
        migration = self._rebalance(step)
        batches = [self.batch(step, r) for r in range(self.scenario.parallelism.dp)]
        w, par = self.scenario.workload, self.scenario.parallelism
        columns = micro_columns(batches[0], w.batch_size // par.ep, self.micro_batches)
        micro, aux = [], []
        for batch in batches:
            counts, batch_aux = self._count_batch(step, batch, columns)
            micro.append(counts)
            aux.append(batch_aux)
        replicas = [c[0] if len(c) == 1 else _add(c) for c in micro]
        self._observe(replicas)
        sub: tuple[StepRouting, ...] = ()
        if len(columns) > 1:
            sub = tuple(
                StepRouting(
                    batch=TokenBatch(batches[0].seq_id[:, c], batches[0].position[:, c]),
                    replicas=[m[i] for m in micro],
                    bins=self.bins,
                )
                for i, c in enumerate(columns)
            )
        return StepRouting(
            batch=batches[0],
            replicas=replicas,
            migration=migration,
            bins=self.bins,
            aux_loss=np.mean(aux, axis=0) if self.gate.needs_scores else None,
            micro=sub,
            placement=self.placement,
        )

    def _chunk_layers(self, batch: TokenBatch) -> int:
        """MoE layers drawn at once, so that one chunk holds about ``CHUNK_ASSIGNMENTS``."""
        moe = self.model.moe
        per_layer = batch.ranks * batch.tokens_per_rank * moe.top_k
        if self.gate.needs_scores:  # scores: one float per token and expert
            per_layer = per_layer // moe.top_k * moe.num_experts
        return max(1, CHUNK_ASSIGNMENTS // max(per_layer, 1))

    def _count_batch(
        self, step: int, batch: TokenBatch, columns: list[np.ndarray]
    ) -> tuple[list[LayerCounts], np.ndarray]:
        """Counts of one replica's batch, per micro-batch (``columns``), and the ``[moe_layers]``
        aux loss of re-gating (empty without it)."""
        w = self.scenario.workload
        pos_bin = (
            np.minimum(batch.position * self.bins // max(w.seq_len, 1), self.bins - 1)
            if self.bins > 1
            else None
        )
        n_moe, chunk = len(self.model.moe_layers), self._chunk_layers(batch)
        parts: list[list[LayerCounts]] = [[] for _ in columns]
        aux: list[float] = []
        for start in range(0, n_moe, chunk):
            layers = np.arange(start, min(n_moe, start + chunk))
            draw, chunk_aux = self._draw(step, layers, batch)
            aux += chunk_aux
            for part, cols in zip(parts, columns, strict=True):
                part.append(
                    count_layers(
                        _take(draw, cols),
                        layers,
                        self.placement,
                        self.chooser,
                        self.step_rule,
                        self.rank_node,
                        self.rng,
                        None if pos_bin is None else pos_bin[:, cols],
                        self.bins,
                        self.copies,
                    )
                )
        return [_concat(p) for p in parts], np.array(aux)

    def _draw(
        self, step: int, layers: np.ndarray, batch: TokenBatch
    ) -> tuple[RoutingDraw, list[float]]:
        """The chunk's assignments (from the source, or re-gated from its scores), with the
        next choices of each assignment when dropped ones reroute; the re-gating aux losses."""
        scores: np.ndarray | None = None  # router scores of the batch, where there are any
        aux: list[float] = []
        if not self.gate.needs_scores:
            draw = self.source.draw(
                step, layers, batch, self.rng, with_weights=self.rule.factor is not None
            )
            if self.rule.reroutes and self.source.records_scores:
                scores = self.source.scores(step, layers, batch, self.rng)
        else:
            draw, scores, aux = self._regate(step, layers, batch)
        if self.rule.reroutes:
            depth = self.rule.reroute_depth
            fallback = (
                next_choices(draw.experts, self.loads[layers], depth, self.rng)
                if scores is None
                else next_choices_by_score(draw.experts, scores, depth)
            )
            draw = RoutingDraw(draw.experts, draw.weights, fallback)
        return draw, aux

    def _observe(self, replicas: list[LayerCounts]) -> None:
        """Fold the step's observed loads into the moving average re-placement reads."""
        observed = np.sum([c.expert_routed for c in replicas], axis=0, dtype=np.float64)
        observed /= np.maximum(observed.sum(axis=1, keepdims=True), 1)
        decay = self.scenario.policies.placement.load_decay
        self.ema = observed if self.ema is None else decay * self.ema + (1 - decay) * observed

    def _regate(
        self, step: int, layers: np.ndarray, batch: TokenBatch
    ) -> tuple[RoutingDraw, np.ndarray, list[float]]:
        """Route ``batch`` with the scenario's gate from the source's router scores; the draw,
        the scores and each layer's aux loss."""
        from moesim.policies.gating import aux_loss, gate_weights

        assert self.gate.select is not None
        scores = self.source.scores(step, layers, batch, self.rng)
        n_layers, ranks, tokens, e = scores.shape
        chosen, weights, aux = [], [], []
        for li in range(n_layers):
            flat = scores[li].reshape(ranks * tokens, e)
            ex = self.gate.select(flat, self.gate_ctx(batch))
            chosen.append(ex)
            weights.append(gate_weights(flat, ex))
            aux.append(aux_loss(flat, ex))
        m = max(x.shape[1] for x in chosen)
        pad = [np.pad(x, ((0, 0), (0, m - x.shape[1])), constant_values=-1) for x in chosen]
        wpad = [np.pad(w, ((0, 0), (0, m - w.shape[1]))) for w in weights]
        shape = (n_layers, ranks, tokens, m)
        draw = RoutingDraw(np.stack(pad).reshape(shape), np.stack(wpad).reshape(shape))
        return draw, scores, aux


def migration_bytes(
    old: Placement, new: Placement, rank_node: np.ndarray, expert_bytes: float
) -> np.ndarray:
    """``[ranks, ranks]`` bytes to move so that every rank holds its new experts.

    A rank that gains an expert copies it from a rank that held it before, preferring one on
    its own node (the first such rank); experts a rank keeps do not move.
    """
    ranks = new.ranks
    out = np.zeros((ranks, ranks))
    for layer in range(new.phy2log.shape[0]):
        before = [set(old.phy2log[layer][old.slot_rank == r].tolist()) for r in range(ranks)]
        for d in range(ranks):
            for e in set(new.phy2log[layer][new.slot_rank == d].tolist()) - before[d]:
                holders = [r for r in range(ranks) if e in before[r]]
                near = [r for r in holders if rank_node[r] == rank_node[d]]
                out[(near or holders)[0], d] += expert_bytes
    return out


def micro_columns(batch: TokenBatch, seqs_per_rank: int, count: int) -> list[np.ndarray]:
    """Token columns of each of ``count`` micro-batches.

    Sequences split into ``count`` groups (as SGLang's two-batch overlap splits requests); a
    rank holding fewer sequences than micro-batches splits its tokens by position instead.
    """
    tokens = batch.tokens_per_rank
    if count == 1:
        return [np.arange(tokens)]
    if seqs_per_rank >= count:
        local = batch.seq_id[0] - batch.seq_id[0].min()
        part = local * count // seqs_per_rank
    else:
        part = np.arange(tokens) * count // tokens
    return [np.flatnonzero(part == i) for i in range(count)]


def _take(draw: RoutingDraw, cols: np.ndarray) -> RoutingDraw:
    """The draw of the tokens ``cols`` (all of them when ``cols`` covers every token)."""
    if cols.size == draw.experts.shape[2]:
        return draw
    w, f = draw.weights, draw.fallback
    return RoutingDraw(
        draw.experts[:, :, cols],
        None if w is None else w[:, :, cols],
        None if f is None else f[:, :, cols],
    )


def _add(parts: list[LayerCounts]) -> LayerCounts:
    """Counts of several micro-batches added up (every field is a count)."""
    return LayerCounts(
        **{f.name: sum(getattr(p, f.name) for p in parts) for f in fields(LayerCounts)}
    )


def _concat(parts: list[LayerCounts]) -> LayerCounts:
    if len(parts) == 1:
        return parts[0]
    return LayerCounts(
        **{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(LayerCounts)}
    )
