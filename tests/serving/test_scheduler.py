"""Serving instances (moesim.serving.scheduler) on step costs given by hand."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from moesim.serving.requests import poisson_arrivals
from moesim.serving.scheduler import InstanceSpec, KVLink, serve


class Linear:
    """A prefill step costs ``a + b * tokens``, a decode step ``c + d * batch``; a prefill
    step's all-to-alls take ``nic`` of each NIC."""

    def __init__(
        self, a: float = 0.01, b: float = 1e-5, c: float = 0.02, d: float = 1e-4, nic: float = 0.0
    ) -> None:
        self.a, self.b, self.c, self.d, self.nic = a, b, c, d, nic

    def prefill_nic_share(self, tokens: int, sequences: int) -> float:
        return self.nic

    def prefill(self, tokens: int, sequences: int) -> float:
        return self.a + self.b * tokens

    def decode(self, batch: int, context: float) -> float:
        return self.c + self.d * batch

    def mixed(self, tokens: int, sequences: int, batch: int, context: float) -> float:
        return max(self.a, self.c) + self.b * tokens + self.d * batch


def _spec(**kw: int) -> InstanceSpec:
    base = {"max_running": 64, "max_prefill_tokens": 4096, "kv_tokens": 1 << 20}
    base.update(kw)
    return InstanceSpec(kv_block_tokens=16, **base)


def _requests(n: int, rate: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        poisson_arrivals(rate, n, rng),
        rng.integers(100, 2000, size=n),
        rng.integers(10, 300, size=n),
    )


def test_every_request_finishes_once_with_its_tokens_in_order() -> None:
    arrival, prompt, output = _requests(300, 5.0)
    t = serve(arrival, prompt, output, [], [_spec()], Linear(), Linear())
    assert np.isfinite(t.finish).all()  # conservation: all 300 done, none lost
    assert (t.arrival <= t.first_token).all() and (t.first_token <= t.finish).all()
    assert sum(s[5] for s in t.steps if s[1] == "decode") > 0
    # the steps of one instance never overlap
    ends = [(s[2], s[3]) for s in t.steps]
    assert all(a[1] <= b[0] + 1e-12 for a, b in pairwise(ends))


def test_littles_law_holds_in_steady_state() -> None:
    """Mean requests in the system = arrival rate x mean time in the system."""
    arrival, prompt, output = _requests(4000, 4.0, seed=1)
    t = serve(arrival, prompt, output, [], [_spec()], Linear(), Linear())
    lo, hi = arrival[500], arrival[3500]  # away from the empty start and the drain
    grid = np.linspace(lo, hi, 20_000)
    inside = (t.arrival[:, None] <= grid) & (t.finish[:, None] > grid)
    mean_in_system = inside.sum(axis=0).mean()
    mask = (t.arrival >= lo) & (t.arrival <= hi)
    rate = mask.sum() / (hi - lo)
    latency = (t.finish - t.arrival)[mask].mean()
    assert mean_in_system == pytest.approx(rate * latency, rel=0.05)


def test_ttft_is_at_least_the_prefill_time_of_the_prompt() -> None:
    arrival, prompt, output = _requests(200, 2.0, seed=2)
    costs = Linear()
    t = serve(arrival, prompt, output, [], [_spec()], costs, costs)
    assert (t.first_token - t.arrival >= costs.a + costs.b * prompt - 1e-12).all()


def test_the_kv_cache_is_never_exceeded_and_preemption_recomputes() -> None:
    """A cache of 6,400 tokens, requests of up to 1,000 + 600: some must be preempted, all
    still finish, and no step starts with more pages in use than the cache has."""
    rng = np.random.default_rng(3)
    n = 60
    arrival = np.zeros(n)
    prompt = rng.integers(200, 1000, size=n)
    output = rng.integers(200, 600, size=n)
    spec = _spec(kv_tokens=6400)
    t = serve(arrival, prompt, output, [], [spec], Linear(), Linear())
    assert np.isfinite(t.finish).all()
    assert t.preemptions.sum() > 0
    assert max(s[7] for s in t.steps) <= spec.kv_blocks * spec.kv_block_tokens
    with pytest.raises(ValueError, match="KV pages"):
        serve(arrival[:1], np.array([7000]), np.array([10]), [], [spec], Linear(), Linear())


def test_results_are_deterministic() -> None:
    arrival, prompt, output = _requests(300, 8.0, seed=4)
    a = serve(arrival, prompt, output, [], [_spec(), _spec()], Linear(), Linear())
    b = serve(arrival, prompt, output, [], [_spec(), _spec()], Linear(), Linear())
    assert np.array_equal(a.finish, b.finish) and a.steps == b.steps


def test_disaggregated_prefill_hands_off_after_the_transfer() -> None:
    """Prefill instances take the prompts; each request starts decoding on a decode instance
    only after its KV transfer; the prefill instances run no decode step."""
    arrival, prompt, output = _requests(200, 4.0, seed=5)
    pre = InstanceSpec(1 << 30, 8192, 1 << 20, 16)
    # 1 kB a token over 4 NICs of 10 MB/s, 0.1 s latency: a prompt of p tokens takes at least
    # 0.1 + p / 10,000 seconds to arrive
    link = KVLink(bytes_per_token=1000.0, nic_bytes_per_s=1e7, latency_s=0.1, ranks=4)
    t = serve(arrival, prompt, output, [pre], [_spec(), _spec()], Linear(), Linear(), link=link)
    assert np.isfinite(t.finish).all()
    kinds = {(s[0], s[1]) for s in t.steps}
    assert (0, "decode") not in kinds and (1, "prefill") not in kinds
    # the second token comes at least one transfer after the first
    multi = output > 2
    alone = 0.1 + prompt / 10_000
    assert (t.finish[multi] - t.first_token[multi] >= alone[multi] - 1e-9).all()


def test_kv_transfers_leaving_one_nic_share_it() -> None:
    """Two prompts of 1,000 tokens done in the same prefill step leave the same NIC (one
    rank): 2 MB at 1 MB/s, both arrive after 2 s (one alone takes 1 s)."""
    pre = InstanceSpec(1 << 30, 8192, 1 << 20, 16)
    link = KVLink(bytes_per_token=1000.0, nic_bytes_per_s=1e6, latency_s=0.0, ranks=1)
    costs = Linear(a=0.0, b=0.0, c=1.0, d=0.0)  # prefill free, a decode step 1 s
    two = serve(
        np.zeros(2), np.array([1000, 1000]), np.array([2, 2]), [pre], [_spec()], costs, costs,
        link=link,
    )  # fmt: skip
    assert two.finish.tolist() == pytest.approx([3.0, 3.0])  # 2 s transfer + one decode step
    one = serve(
        np.zeros(1), np.array([1000]), np.array([2]), [pre], [_spec()], costs, costs, link=link
    )
    assert one.finish.tolist() == pytest.approx([2.0])


def test_kv_transfers_get_what_the_prefill_steps_all_to_alls_leave() -> None:
    """Two 1,000-token prompts (1 MB of KV cache each, 1 MB/s NIC), prefilled one per 1 s
    step whose all-to-alls take 3/4 of the NIC. The first leaves at 1 s: 0.25 MB during the
    second step, then it shares the whole NIC with the second (from 2 s): 0.75 MB at 0.5 MB/s,
    arriving at 3.5 s; the second's last 0.25 MB alone, at 3.75 s. Decode steps of 1 s:
    [3.5, 4.5], then [4.5, 5.5]."""
    pre = InstanceSpec(1 << 30, 1000, 1 << 20, 16)  # one prompt per prefill step
    link = KVLink(bytes_per_token=1000.0, nic_bytes_per_s=1e6, latency_s=0.0, ranks=1)
    pre_costs = Linear(a=1.0, b=0.0, nic=0.75)  # a prefill step 1 s
    dec_costs = Linear(c=1.0, d=0.0)
    t = serve(
        np.zeros(2), np.array([1000, 1000]), np.array([2, 2]), [pre], [_spec()], pre_costs,
        dec_costs, link=link,
    )  # fmt: skip
    assert t.first_token.tolist() == pytest.approx([1.0, 2.0])
    assert t.finish.tolist() == pytest.approx([4.5, 5.5])


def test_speculative_tokens_shorten_decoding() -> None:
    arrival, prompt, output = _requests(100, 1.0, seed=6)
    one = serve(arrival, prompt, output, [], [_spec()], Linear(), Linear())
    mtp = serve(arrival, prompt, output, [], [_spec()], Linear(), Linear(), tokens_per_step=1.7)
    d1 = sum(1 for s in one.steps if s[1] == "decode")
    d2 = sum(1 for s in mtp.steps if s[1] == "decode")
    assert d2 < d1
    assert np.nanmean(mtp.finish - mtp.first_token) < np.nanmean(one.finish - one.first_token)


def test_closed_loop_clients_keep_the_concurrency() -> None:
    arrival, prompt, output = _requests(200, 1.0, seed=7)
    t = serve(arrival, prompt, output, [], [_spec()], Linear(), Linear(), closed_loop=8)
    assert np.isfinite(t.finish).all()
    grid = np.linspace(t.arrival.min(), np.nanmax(t.arrival), 2000)
    inside = ((t.arrival[:, None] <= grid) & (t.finish[:, None] > grid)).sum(axis=0)
    assert inside.max() <= 8


def test_one_token_requests_finish_on_the_prefill_instance() -> None:
    """A request asking for one token is done when its prompt is: it never moves."""
    pre = InstanceSpec(1 << 30, 8192, 1 << 20, 16)
    link = KVLink(bytes_per_token=1000.0, nic_bytes_per_s=1e7, latency_s=0.1, ranks=2)
    arrival, prompt, _ = _requests(50, 4.0, seed=8)
    t = serve(
        arrival,
        prompt,
        np.ones(50, dtype=np.int64),
        [pre],
        [_spec()],
        Linear(),
        Linear(),
        link=link,
    )
    assert np.array_equal(t.finish, t.first_token)
    assert {s[0] for s in t.steps} == {0}  # only the prefill instance ran


def test_mixed_batching_decodes_every_step_and_keeps_the_token_budget() -> None:
    """vLLM-style steps: the running requests decode in every step, prompt chunks fill the
    rest of the budget; all requests finish; decoding never stalls behind a prompt, so the
    slowest inter-token gap is shorter than with alternating prefill and decode steps."""
    arrival, prompt, output = _requests(300, 6.0, seed=5)
    spec = _spec(max_prefill_tokens=1024)
    alt = serve(arrival, prompt, output, [], [spec], Linear(), Linear())
    mix = serve(arrival, prompt, output, [], [spec], Linear(), Linear(), mixed=True)
    assert np.isfinite(mix.finish).all()
    kinds = {s[1] for s in mix.steps}
    assert "mixed" in kinds and kinds <= {"mixed", "decode", "prefill"}
    assert all(s[4] <= 1024 for s in mix.steps)  # decode tokens count against the budget
    assert all(s[6] > 0 for s in mix.steps if s[1] == "mixed")
    tpot_mix = (mix.finish - mix.first_token) / np.maximum(output - 1, 1)
    tpot_alt = (alt.finish - alt.first_token) / np.maximum(output - 1, 1)
    assert np.mean(tpot_mix) < np.mean(tpot_alt)
    assert np.percentile(tpot_mix, 99) < np.percentile(tpot_alt, 99)
