"""Step costs of serving instances (moesim.serving.costs): the grid's interpolation measured
against simulating each step directly, and the KV cache's size worked out by hand."""

from __future__ import annotations

import pytest

from moesim.config.loading import load_scenario
from moesim.serving.costs import LayerModelCosts, instance_scenario, kv_tokens, step_seconds
from moesim.serving.run import pools
from tests.conftest import SCENARIOS

SERVE = [
    "workload.mode=serve",
    "workload.batch_size=256",
    "serving.requests.rate_per_s=10",
    "serving.requests.count=50",
]


def _decode_pool():
    r = load_scenario(SCENARIOS / "mixtral-8x7b-decode-8xh100.yaml", SERVE)
    dec, pre = pools(r)
    assert pre is None and dec.world == 8
    return dec


@pytest.mark.parametrize(("batch", "context"), [(104, 3000), (40, 700), (200, 6000)])
def test_decode_steps_between_grid_points_match_direct_simulation(batch: int, context: int):
    """Measured: within 0.03% (the attention is linear in the context, the MoE part close to
    linear in the batch between powers of two)."""
    dec = _decode_pool()
    est = LayerModelCosts(dec, 256).decode(batch, context)
    real = step_seconds(instance_scenario(dec, "decode", batch, context))
    assert est == pytest.approx(real, rel=0.01)


@pytest.mark.parametrize(("tokens", "sequences"), [(3000, 8), (9000, 8), (20000, 8), (24000, 24)])
def test_prefill_steps_between_grid_points_match_direct_simulation(
    tokens: int, sequences: int
) -> None:
    """Measured: within 4.3% (the attention is quadratic in the chunk; linear interpolation
    between powers of two over-estimates a little)."""
    dec = _decode_pool()
    est = LayerModelCosts(dec, 256).prefill(tokens, sequences)
    real = step_seconds(instance_scenario(dec, "prefill", sequences, tokens // sequences))
    assert est == pytest.approx(real, rel=0.06)


def test_the_kv_cache_holds_what_the_weights_leave() -> None:
    """Mixtral-8x7B over EP8 in bf16: each GPU's HBM less its weights and workspace, over
    32 layers x 8 KV heads x 128 x 2 (K and V) x 2 bytes per token, times the 8 ranks."""
    dec = _decode_pool()
    m, hw = dec.model, dec.hardware
    weights = (m.non_expert_params() + len(m.moe_layers) * 1 * m.expert_params) * 2.0
    free = hw.gpu.hbm_bytes - weights - hw.gpu.workspace_bytes
    per_token = 32 * 8 * 128 * 2 * 2.0
    assert kv_tokens(dec) == int(free // per_token) * 8


@pytest.mark.parametrize(
    ("tokens", "sequences", "batch", "context"),
    [(512, 1, 16, 1000), (2048, 2, 64, 1500), (8000, 4, 200, 2000), (128, 1, 200, 3000)],
)
def test_a_mixed_step_costs_between_its_larger_part_and_both_parts(
    tokens: int, sequences: int, batch: int, context: int
) -> None:
    """A mixed step reads the weights once: it costs more than either of its parts alone,
    less than a prefill step and a decode step one after the other; with no decoding
    requests (or no prompt tokens) it is the pure step."""
    c = LayerModelCosts(_decode_pool(), 256)
    pre, dec = c.prefill(tokens, sequences), c.decode(batch, context)
    mixed = c.mixed(tokens, sequences, batch, context)
    assert max(pre, dec) <= mixed < pre + dec
    assert c.mixed(tokens, sequences, 0, context) == pre
    assert c.mixed(0, 0, batch, context) == dec
    # longer contexts of the decoding requests cost more (their attention reads more KV)
    assert c.mixed(tokens, sequences, batch, 4 * context) > mixed
