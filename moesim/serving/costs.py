"""Step costs of a serving instance, priced by the layer model and cached.

A serving run takes thousands of engine steps whose batches repeat in shape, so a step is not
simulated from scratch each time: :class:`LayerModelCosts` runs the SimPy layer model (routing
drawn as the scenario says, all-to-alls on the network, kernels from the profile) for one
step at points of a grid, once each, and interpolates between them:

- **decode** steps at ``batch`` requests (over the instance's ``ep`` DP-attention ranks) and
  mean context ``c``: the grid has batches ``ep * 2^i`` and contexts ``256 * 2^j``; a step
  costs the bilinear interpolation of its four neighbours. Between contexts it is exact for
  what depends on the context (the attention reads ``batch x c`` KV bytes, linear in ``c``);
  between batches, the expert GEMMs and all-to-alls grow with the batch. Measured against
  simulating the step directly (``tests/serving/test_costs.py``, Mixtral-8x7B on 8 H100):
  within 0.03%.
- **prefill** steps of ``tokens`` prompt tokens in chunks of ``L`` tokens on average: on a
  grid of ``128 * 2^i`` tokens per rank and ``128 * 2^j`` tokens per chunk (each rank running
  ``tokens per rank / L`` sequences of ``L``), interpolated bilinearly (within 4.3% of direct
  simulation on the same case: the attention is quadratic in the chunk); a chunk attends to
  its own tokens only (the context of the prompt's earlier chunks is not charged).

- **mixed** steps (prompt chunks batched with decoding requests, ``serving.batching: mixed``):
  the prefill grid prices all of the step's tokens as prompt tokens in the prompts' chunks,
  and the op model then moves the decoding requests' attention block (``num_layers`` of them,
  per DP-attention rank) from a prompt chunk's to a decode step's at their context. The
  projections, experts and all-to-alls of the step are then those of its token count, the
  decode attention reads its KV cache. Not measured against a direct simulation (the engine
  runs prefill or decode steps only); a mixed step costs at least as much as either of its
  parts alone, which is enforced.

The pricing runs the engine directly, without the HBM check of a standalone run: the KV
cache a serving instance holds is bounded by the scheduler instead (:func:`kv_tokens`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np

from moesim.config.loading import ResolvedScenario
from moesim.dtypes import ELEMENT_BYTES
from moesim.timing.memory import GiB, hbm_usage

if TYPE_CHECKING:
    from moesim.timing.costs import OpCostModel

CONTEXT_BASE = 256
"""Smallest context of the decode grid, tokens."""
PREFILL_BASE = 128
"""Smallest tokens per rank of the prefill grid."""


def instance_scenario(r: ResolvedScenario, mode: str, batch: int, length: int) -> ResolvedScenario:
    """One instance's one-step scenario: ``mode`` decode (``batch`` requests at context
    ``length``) or prefill (``batch`` sequences of ``length`` tokens)."""
    s = r.scenario
    w = s.workload.model_copy(
        update={
            "mode": mode,
            "batch_size": batch,
            "context_len": length if mode == "decode" else 0,
            "seq_len": length if mode == "prefill" else 0,
            "steps": 1,
        }
    )
    out = s.model_copy(
        update={
            "workload": w,
            "serving": None,
            "output": s.output.model_copy(update={"timeline_steps": 0}),
        }
    )
    return dataclasses.replace(r, scenario=out)


OFFLOAD_STEPS = 16
"""Steps a grid point of an offloading instance runs; its cost is the mean of the second half
(the expert cache warm, as in a long-running server), not the first step's cold misses."""


def step_seconds(r: ResolvedScenario) -> float:
    """Seconds of a step of ``r`` on the layer model (with expert offload, of a step with the
    cache warm: :data:`OFFLOAD_STEPS`)."""
    return step_cost(r)[0]


def step_cost(r: ResolvedScenario) -> tuple[float, float]:
    """Seconds of a step of ``r`` (as :func:`step_seconds`) and the bytes each GPU sent
    between nodes in it, on average (its all-to-alls' RDMA traffic)."""
    from moesim.metrics.collector import Collector
    from moesim.routing.stage import RoutingStage
    from moesim.timing.costs import scenario_costs
    from moesim.timing.engine import Engine

    s = r.scenario
    steps = OFFLOAD_STEPS if s.policies.offload.enabled else 1
    if steps > 1:
        w = s.workload.model_copy(update={"steps": steps})
        r = dataclasses.replace(r, scenario=s.model_copy(update={"workload": w}))
        s = r.scenario
    rng = np.random.default_rng(np.random.SeedSequence(s.seed).spawn(2)[0])
    routing = RoutingStage(s, r.model, r.gpus_per_node, rng)
    col = Collector(steps, r.model.num_layers, r.world, r.model.moe_layers, r.gpus_per_node, 0)
    engine = Engine(r, routing, scenario_costs(r), col)
    engine.run()
    tail = slice(steps // 2, None)
    return float(col.step_time_s[tail].mean()), float(col.bytes_inter[tail].mean()) / r.world


def kv_tokens(r: ResolvedScenario) -> int:
    """Tokens of KV cache one instance holds: each GPU's HBM left by its weights and
    workspace, over the bytes a token's KV cache takes on it, times the DP-attention ranks."""
    par, m = r.scenario.parallelism, r.model
    probe = instance_scenario(r, "decode", par.ep, 1)
    usage = hbm_usage(probe, probe.slots_per_rank)
    free = r.hardware.gpu.hbm_bytes - usage.weights - usage.workspace
    att = m.attention
    kv_split = par.tp if att.type == "gqa" and att.num_kv_heads >= par.tp else 1
    per_token = m.num_layers * att.kv_elements_per_token() * 2.0 / kv_split
    if free <= per_token:
        raise ValueError(
            f"{r.scenario.name}: the weights leave {free / GiB:.1f} GiB per GPU, no room for "
            "a KV cache"
        )
    return int(free // per_token) * par.ep


def kv_bytes_per_token(r: ResolvedScenario) -> float:
    """Bytes of one token's KV cache over all layers (what a disaggregated handoff moves)."""
    m = r.model
    return m.num_layers * m.attention.kv_elements_per_token() * float(ELEMENT_BYTES["bf16"])


class LayerModelCosts:
    """Step costs of one instance (see the module docstring).

    Args:
        r: The instance's scenario (one EP group: ``dp`` 1).
        max_batch: Most requests a decode step holds.
    """

    def __init__(self, r: ResolvedScenario, max_batch: int) -> None:
        self.r = r
        self.ep = r.scenario.parallelism.ep
        self.max_batch = max(max_batch, self.ep)
        self._cache: dict[tuple[str, int, int], tuple[float, float]] = {}
        self._cm: OpCostModel | None = None
        self.simulated = 0

    def _at(self, mode: str, batch: int, length: int, nic: bool = False) -> float:
        """Seconds of a grid point's step (``nic``: the bytes each GPU sends between nodes
        in it)."""
        key = (mode, batch, length)
        if key not in self._cache:
            self._cache[key] = step_cost(instance_scenario(self.r, mode, batch, length))
            self.simulated += 1
        return self._cache[key][1 if nic else 0]

    def decode(self, batch: int, context: float) -> float:
        """Seconds of a decode step of ``batch`` requests at mean context ``context``."""
        b = min(max(batch, 1), self.max_batch) / self.ep
        b0 = 2 ** math.floor(math.log2(b)) if b >= 1 else 1
        b1 = min(b0 * 2, self._top())
        c = max(float(context), CONTEXT_BASE)
        c0 = CONTEXT_BASE * 2 ** math.floor(math.log2(c / CONTEXT_BASE))
        c1 = c0 * 2

        def at(bb: float, cc: float) -> float:
            return self._at("decode", int(bb * self.ep), int(cc))

        fb = 0.0 if b1 == b0 else (max(b, 1) - b0) / (b1 - b0)
        fc = (c - c0) / (c1 - c0)
        low = at(b0, c0) + fc * (at(b0, c1) - at(b0, c0))
        if fb == 0.0:
            return low
        high = at(b1, c0) + fc * (at(b1, c1) - at(b1, c0))
        return low + fb * (high - low)

    def _top(self) -> int:
        """Largest per-rank batch of the grid (a power of two at or above the cap)."""
        return 2 ** math.ceil(math.log2(max(self.max_batch / self.ep, 1)))

    def mixed(self, tokens: int, sequences: int, batch: int, context: float) -> float:
        """Seconds of a step of ``tokens`` prompt tokens from ``sequences`` requests and
        ``batch`` decoding requests at mean context ``context`` (see the module docstring)."""
        if batch == 0:
            return self.prefill(tokens, sequences)
        if tokens == 0:
            return self.decode(batch, context)
        from moesim.timing.costs import scenario_costs, total

        if self._cm is None:
            self._cm = scenario_costs(self.r)
        whole = self.prefill(tokens + batch, sequences)
        chunk = (tokens + batch) / max(sequences, 1)
        d = batch / self.ep
        as_decode = total(self._cm.attention(d, context, d * context, True, 0.0))
        as_prompt = total(self._cm.attention(d, chunk / 2, 0.0, False, chunk))
        moved = self.r.model.num_layers * float(as_decode - as_prompt)
        return max(whole + moved, self.prefill(tokens, sequences), self.decode(batch, context))

    def prefill(self, tokens: int, sequences: int) -> float:
        """Seconds of a prefill step of ``tokens`` prompt tokens from ``sequences`` requests
        (chunks of ``tokens / sequences`` tokens on average)."""
        return self._prefill(tokens, sequences, False)

    def prefill_nic_share(self, tokens: int, sequences: int) -> float:
        """Share of each GPU's NIC a prefill step's own all-to-alls take, on average over the
        step: the bytes each GPU sends between nodes over the NIC's rate, over the step's
        seconds (interpolated as the step's seconds are); in [0, 1]."""
        node = self.r.hardware.node
        rate = node.nic_gb_per_s * 1e9 * node.nic_efficiency
        sent = self._prefill(tokens, sequences, True)
        return min(max(sent / rate / self.prefill(tokens, sequences), 0.0), 1.0)

    def _prefill(self, tokens: int, sequences: int, nic: bool) -> float:
        t = max(tokens / self.ep, PREFILL_BASE)
        length = min(max(tokens / max(sequences, 1), PREFILL_BASE), t)
        t0 = PREFILL_BASE * 2 ** math.floor(math.log2(t / PREFILL_BASE))
        l0 = PREFILL_BASE * 2 ** math.floor(math.log2(length / PREFILL_BASE))

        def at(tt: float, ll: float) -> float:
            ll = min(ll, tt)  # a chunk is no longer than the rank's tokens
            return self._at("prefill", int(self.ep * (tt // ll)), int(ll), nic)

        ft = (t - t0) / t0
        fl = (length - l0) / l0
        low = at(t0, l0) + fl * (at(t0, 2 * l0) - at(t0, l0)) if l0 < t0 else at(t0, t0)
        if ft == 0.0:
            return low
        high = at(2 * t0, l0) + fl * (at(2 * t0, 2 * l0) - at(2 * t0, l0))
        return low + ft * (high - low)
