"""Fitted generators on the published OLMoE and Mixtral counts (the issue's acceptance check)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.traces._draw_jit import draw_layer as draw_compiled
from moesim.traces.fit import (
    affinity_tv,
    draw_layer_numpy,
    fit_counts,
    fit_trace,
    slot_matched_counts,
    sorted_load_tv,
    synthesize,
)
from moesim.traces.stats import load_counts
from tests.traces.conftest import COUNTS, make_trace, needs

CASES = [
    (model, domain)
    for model, domains in (
        ("olmoe", ["arxiv", "book", "c4", "github", "wikipedia", "tulu"]),
        ("mistral", ["arxiv", "book", "c4", "github", "wikipedia"]),
    )
    for domain in domains
]


@needs(COUNTS)
@pytest.mark.parametrize(("model", "domain"), CASES)
def test_fitted_generator_reproduces_published_counts(model: str, domain: str) -> None:
    path = COUNTS / f"{model}.json"
    raw = json.loads(path.read_text())
    trace = synthesize(fit_counts(path, domain), tokens=40_000, seq_len=2048, seed=1)
    layers, counts = load_counts(trace)
    for i, layer in enumerate(layers):
        real = np.array(raw["expert_counts"][domain][str(layer)], dtype=float)
        real_mm, fit_mm = real.max() / real.mean(), counts[i].max() / counts[i].mean()
        assert abs(fit_mm / real_mm - 1) < 0.10, (layer, real_mm, fit_mm)
        assert sorted_load_tv(real, counts[i]) < 0.05
    for a, b in (("0", "7"), ("7", "15")):
        real_co = raw.get("crosslayer_counts", {}).get(domain, {}).get(f"{a}-{b}")
        if real_co is None:
            continue
        real_co = np.array(real_co, dtype=float)
        independent = np.outer(real_co.sum(axis=1), real_co.sum(axis=0))
        fitted = affinity_tv(real_co, slot_matched_counts(trace, int(a), int(b)))
        # affinity is reproduced: much closer than layers drawn independently
        assert fitted < 0.4 * affinity_tv(real_co, independent), (a, b)


def test_fit_to_a_trace_round_trips_skew() -> None:
    rng = np.random.default_rng(0)
    pop = np.array([0.4, 0.2, 0.15, 0.1, 0.05, 0.05, 0.03, 0.02])
    experts = np.stack(
        [
            np.array([rng.choice(8, size=2, replace=False, p=pop) for _ in range(3000)])
            for _ in range(2)
        ]
    )
    real = make_trace(experts, 8)
    synth = synthesize(fit_trace(real), tokens=20_000, seq_len=100, seed=0)
    _, a = load_counts(real)
    _, b = load_counts(synth)
    for i in range(2):
        assert sorted_load_tv(a[i], b[i]) < 0.02


def test_unknown_domain_is_named() -> None:
    from moesim.traces.format import TraceError

    if not COUNTS.exists():
        pytest.skip(f"real routing data absent: {COUNTS}")
    with pytest.raises(TraceError, match="no domain 'poetry'; valid: arxiv"):
        fit_counts(COUNTS / "mistral.json", "poetry")


@pytest.mark.parametrize("conditioned", [False, True])
def test_compiled_draw_picks_what_numpy_picks(conditioned: bool) -> None:
    """Same weights, same uniforms (the extremes 0 and 1 - 2**-53 included): same experts."""
    rng = np.random.default_rng(3)
    e, k, n = 24, 4, 4000
    w = np.exp(rng.normal(size=e) * 2)
    t = rng.dirichlet(np.full(e, 0.2), size=e) + 1e-6
    prev = rng.integers(0, e, (n, k)).astype(np.int16)
    u = rng.random((k, n))
    u[:, :3] = 0.0
    u[:, 3:6] = 1 - 2**-53
    a = draw_layer_numpy(w, t if conditioned else None, prev if conditioned else None, u)
    b = draw_compiled(w, t if conditioned else np.ones((1, 1)), prev, conditioned, u)
    assert np.array_equal(a, b)
    assert all(len(set(row)) == k for row in a.tolist())


def test_draw_is_plackett_luce() -> None:
    """The first slot picks j with probability w_j / sum w; the second, given the first i,
    with w_j / (sum w - w_i): counted over 200k tokens, within 5 sigma of each."""
    w = np.array([8.0, 4.0, 2.0, 1.0, 1.0])
    n = 200_000
    picks = draw_layer_numpy(w, None, None, np.random.default_rng(0).random((2, n)))
    first = np.bincount(picks[:, 0], minlength=5) / n
    p = w / w.sum()
    assert np.all(np.abs(first - p) < 5 * np.sqrt(p * (1 - p) / n))
    after0 = picks[picks[:, 0] == 0, 1]
    second = np.bincount(after0, minlength=5) / len(after0)
    q = np.where(np.arange(5) == 0, 0.0, w) / (w.sum() - w[0])
    assert np.all(np.abs(second - q) <= 5 * np.sqrt(q * (1 - q) / len(after0)) + 1e-12)


def test_a_fit_is_kept_for_its_file_and_redone_when_the_file_changes(tmp_path) -> None:
    """A sweep over a fitted scenario fits once; an edited file is fitted again."""
    from moesim.traces.fit import load_fit

    rng = np.random.default_rng(0)
    experts = np.stack([rng.permuted(np.tile(np.arange(8), (500, 1)), axis=1)[:, :2]] * 2)
    path = tmp_path / "t.parquet"
    from moesim.traces import write_trace

    write_trace(make_trace(experts, 8), path)
    first = load_fit(path)
    assert load_fit(path) is first
    assert not first.log_w.flags.writeable
    write_trace(make_trace(experts[:, :400], 8), tmp_path / "u.parquet")
    (tmp_path / "u.parquet").replace(path)
    assert load_fit(path) is not first


def test_a_layer_drawn_without_the_layer_before_keeps_its_measured_loads() -> None:
    """Model layers that map to one fitted layer are drawn without the layer before; they must
    keep that layer's loads. They used the weights fitted together with the transitions, which
    had already concentrated the load: OLMoE's layer 7 (max/mean 6.3) came out at 1.7."""
    rng = np.random.default_rng(0)
    pop = np.array([0.5, 0.2, 0.1, 0.08, 0.05, 0.04, 0.02, 0.01])
    first = np.array([rng.choice(8, size=2, replace=False, p=pop) for _ in range(4000)])
    second = (first + 1) % 8  # the layer after follows the layer before closely
    real = make_trace(np.stack([first, second]), 8)
    fit = fit_trace(real)
    x = fit.sample(40_000, np.random.default_rng(1), np.array([0, 1, 1]))
    measured = fit.shares[1] * 40_000 * 2
    for g in (1, 2):  # conditioned, then drawn without the layer before
        assert sorted_load_tv(measured, np.bincount(x[g].ravel(), minlength=8)) < 0.03, g
