"""Pipeline-parallel training: schedules, their bubbles, stage layouts and memory
(moesim.timing.pipeline, moesim.timing.stages)."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.config.loading import load_scenario
from moesim.errors import ConfigErrors
from moesim.runner import simulate
from moesim.timing import gradsync
from moesim.timing.memory import activation_bytes_per_layer, stage_usages
from moesim.timing.pipeline import (
    Part,
    make_schedule,
    peak_in_flight,
    run_schedule,
    split_layers,
)
from tests.conftest import SCENARIOS

BASE = SCENARIOS / "mixtral-8x7b-decode-8xh100.yaml"
TRAIN = [
    "model=olmoe-1b-7b",
    "parallelism.ep=4",
    "parallelism.pp=2",
    "workload.mode=train",
    "workload.batch_size=8",
    "workload.seq_len=256",
    "workload.micro_batches=4",
    "workload.steps=1",
]


def _r(*sets: str):
    return load_scenario(BASE, [*TRAIN, *sets])


def _uniform(f: float, b: float, w: float = 0.0, fb: float = 0.0):
    def duration(op: tuple[Part, ...], _stage: int) -> float:
        if len(op) == 2:
            return fb
        return {"F": f, "B": b, "Bi": b - w, "W": w}[op[0].kind]

    return duration


def _no_p2p(_a: int, _b: int) -> float:
    return 0.0


@pytest.mark.parametrize(("pp", "m"), [(2, 2), (4, 4), (4, 8), (8, 24)])
def test_1f1b_idles_pp_minus_one_forward_backward_pairs(pp: int, m: int) -> None:
    """Narayanan et al. 2021, section 2.2.1: bubble (p - 1)(F + B) on every stage."""
    timed = run_schedule(make_schedule("1f1b", pp, 1, m), _uniform(1.0, 2.0), _no_p2p)
    end = max(t[-1].end for t in timed)
    assert end == pytest.approx((m + pp - 1) * 3.0)
    for ops in timed:
        busy = sum(t.end - t.start for t in ops)
        assert end - busy == pytest.approx((pp - 1) * 3.0)


@pytest.mark.parametrize(("pp", "vpp", "m"), [(2, 2, 4), (4, 2, 8), (4, 3, 12), (4, 2, 4)])
def test_interleaving_divides_the_bubble_by_the_virtual_stages(pp: int, vpp: int, m: int) -> None:
    """Section 2.2.2: with v chunks per stage, each F/v and B/v, the bubble is (p-1)(F+B)/v."""
    timed = run_schedule(
        make_schedule("interleaved", pp, vpp, m), _uniform(1.0 / vpp, 2.0 / vpp), _no_p2p
    )
    end = max(t[-1].end for t in timed)
    assert end == pytest.approx(m * 3.0 + (pp - 1) * 3.0 / vpp)


@pytest.mark.parametrize(("pp", "m"), [(4, 8), (4, 12), (8, 16), (8, 20)])
@pytest.mark.parametrize("fb", [3.0, 2.5])
def test_dualpipe_bubble_is_the_published_formula(pp: int, m: int, fb: float) -> None:
    """DeepSeek-V3 report table 2 / DualPipe README: (PP/2 - 1)(F&B + B - 3W), for its chunk
    times (F = W = 1, B = 2 with W included; F&B the overlapped pair); the fullest stage."""
    sched = make_schedule("dualpipe", pp, 1, m)
    timed = run_schedule(sched, _uniform(1.0, 2.0, 1.0, fb), _no_p2p)
    end = max(t[-1].end for t in timed)
    idle = [end - sum(t.end - t.start for t in ops) for ops in timed]
    assert max(idle) == pytest.approx((pp / 2 - 1) * (fb + 2.0 - 3.0))


@pytest.mark.parametrize(
    ("name", "pp", "vpp", "m"),
    [("1f1b", 4, 1, 6), ("interleaved", 2, 3, 4), ("dualpipe", 4, 1, 10), ("1f1b", 1, 1, 3)],
)
def test_every_micro_batch_runs_each_chunk_forward_and_backward_once(
    name: str, pp: int, vpp: int, m: int
) -> None:
    sched = make_schedule(name, pp, vpp, m)
    seen: dict[tuple[str, int, int], int] = {}
    for stage, ops in enumerate(sched.order):
        for op in ops:
            for p in op:
                assert sched.paths[p.mb][p.pos][0] == stage  # on the stage its path says
                kind = "B" if p.kind == "Bi" else p.kind
                seen[kind, p.mb, p.pos] = seen.get((kind, p.mb, p.pos), 0) + 1
    for mb, path in enumerate(sched.paths):
        for pos in range(len(path)):
            assert seen.pop(("F", mb, pos)) == 1 and seen.pop(("B", mb, pos)) == 1
    # what is left are the deferred weight gradients, one per zero-bubble backward
    assert all(k[0] == "W" and v == 1 for k, v in seen.items())


def test_1f1b_order_is_megatrons() -> None:
    sched = make_schedule("1f1b", 4, 1, 6)
    names = [f"{op[0].kind}{op[0].mb}" for op in sched.order[1]]
    # stage 1 of 4: two warm-up forwards, then one forward one backward, then the rest
    assert names == ["F0", "F1", "F2", "B0", "F3", "B1", "F4", "B2", "F5", "B3", "B4", "B5"]


def test_point_to_point_sends_delay_the_next_stage() -> None:
    sched = make_schedule("1f1b", 2, 1, 1)
    timed = run_schedule(sched, _uniform(1.0, 2.0), lambda a, b: 0.5)
    assert timed[1][0].start == pytest.approx(1.5)  # F0 on stage 1 after stage 0's + send
    assert timed[0][-1].start == pytest.approx(1.5 + 1.0 + 2.0 + 0.5)


def test_activations_in_flight_follow_the_schedule() -> None:
    one = make_schedule("1f1b", 4, 1, 8)
    held = [peak_in_flight(one, s, lambda c: 1.0) for s in range(4)]
    assert held == [4.0, 3.0, 2.0, 1.0]  # stage s keeps pp - s micro-batches
    few = make_schedule("1f1b", 4, 1, 2)
    assert peak_in_flight(few, 0, lambda c: 1.0) == 2.0
    dual = make_schedule("dualpipe", 8, 1, 16)
    # DualPipe keeps at most PP + 1 chunks' activations on a rank (its README's table)
    assert max(peak_in_flight(dual, s, lambda c: 1.0) for s in range(8)) == 9.0


def test_layers_split_as_evenly_as_possible() -> None:
    assert [len(c) for c in split_layers(61, 16)] == [3, 3] + [4] * 13 + [3]
    paired = [len(c) for c in split_layers(61, 16, paired=True)]
    assert sorted({paired[i] + paired[15 - i] for i in range(8)}) == [7, 8]
    assert [len(c) for c in split_layers(10, 3, [2, 5, 3])] == [2, 5, 3]
    with pytest.raises(ValueError, match="does not cut"):
        split_layers(10, 3, [2, 5, 4])


def test_stages_are_outermost_in_the_rank_order() -> None:
    """Megatron-Core's tp-ep-dp-pp: a stage is dp * ep * tp consecutive GPUs."""
    r = _r()
    assert r.world == 8 and r.scenario.parallelism.stage_world == 4
    res = simulate(r)
    events = [e for e in res.timeline if e.get("cat") == "pipeline"]
    stage_of = {e["args"]["stage"]: e["tid"] for e in events}
    assert stage_of == {0: 0, 1: 4}


@pytest.mark.parametrize(
    ("sets", "field", "words"),
    [
        (["parallelism.vpp=2"], "policies.pipeline.schedule", "interleaved 1F1B needs vpp > 1"),
        (
            ["policies.pipeline.schedule=dualpipe", "workload.micro_batches=2"],
            "policies.pipeline.schedule",
            "DualPipe needs",
        ),
        (["parallelism.pp_layout=[4,4]"], "parallelism.pp_layout", "summing to 8"),
        (["parallelism.pp=4", "parallelism.ep=2"], "parallelism.pp", None),
    ],
)
def test_bad_pipeline_layouts_are_clear_errors(
    sets: list[str], field: str, words: str | None
) -> None:
    try:
        r = _r(*sets)
    except ConfigErrors as e:
        assert field in str(e) and (words is None or words in str(e))
    else:  # pp=4 x ep=2 is a valid layout of the 8 GPUs
        assert words is None and r.world == 8


def test_pipeline_stages_are_for_training() -> None:
    with pytest.raises(ConfigErrors, match="training only"):
        load_scenario(BASE, ["parallelism.pp=2", "parallelism.ep=4"])


def test_stage_memory_worked_out_by_hand() -> None:
    """OLMoE (16 layers, untied embeddings) over pp 2, ep 4, bf16, ZeRO-1, 1F1B, 4 micro-batches:
    stage 0 holds layers 0-7 and the embedding, stage 1 layers 8-15 and the output layer, and
    stage 0 keeps 2 micro-batches' activations, stage 1 one."""
    r = _r()
    m = r.model
    h, f, k = m.hidden_size, m.moe.expert_intermediate_size, m.moe.top_k
    table = m.vocab_size * h
    layer = m.attention.params(h) + m.gate_params
    experts = r.slots_per_rank * m.expert_params
    params = 8 * (layer + experts) + table
    per_layer = (8 // 4) * 256 * (15 * h + k * (2 * h + 6 * f))
    assert activation_bytes_per_layer(r) == per_layer
    dense = 8 * layer + table
    for stage, usage in enumerate(stage_usages(r)):
        assert usage.weights == pytest.approx(2.0 * params)
        assert usage.activations == pytest.approx((2 - stage) * 8 * per_layer)
        # ZeRO-1 shards the dense state over the 4 GPUs; experts have no replica (dp 1)
        shard = dense / 4 + 8 * experts
        assert usage.optimizer == pytest.approx(12 * shard + 2 * params)


def test_recompute_keeps_fewer_activations() -> None:
    none, sel, full = (
        activation_bytes_per_layer(_r(f"workload.recompute={rc}"))
        for rc in ("none", "selective", "full")
    )
    assert full < sel < none
    assert full == (8 // 4) * 256 * 2 * _r().model.hidden_size


def test_gradient_bytes_per_stage_are_its_parameter_shards() -> None:
    """ZeRO-1 over the 4 GPUs of a stage: each sends 3/4 of its stage's dense gradients (bf16)
    to reduce-scatter them and 3/4 of its weights to gather them; experts have no replica."""
    r = _r()
    res = simulate(r)
    dense, _ = gradsync.layer_params(r)
    by_hand = sum(4 * 2 * (3 / 4) * 2.0 * dense[s * 8 : (s + 1) * 8].sum() for s in range(2))
    assert res.summary["data_parallel"]["bytes_intra_node"] == pytest.approx(by_hand, rel=1e-9)
    for stage in range(2):
        held = list(range(stage * 8, stage * 8 + 8))
        bs = gradsync.buckets(r, held)
        assert sum(b.params for b in bs) == pytest.approx(dense[held].sum())
        assert {b.kind for b in bs} == {"dense"}


def test_a_pipelined_step_reports_its_bubble_and_stages() -> None:
    r = _r()
    a = simulate(r).summary
    b = simulate(r).summary
    assert a == b  # deterministic
    p = a["pipeline"]
    assert (p["schedule"], p["pp"], p["micro_batches"], p["chunk_layers"]) == ("1f1b", 2, 4, [8, 8])
    assert 0 < p["bubble_fraction"] < 0.5
    for s in p["stages"]:
        assert s["busy_s"] + s["bubble_s"] + s["gradients_s"] == pytest.approx(a["step_time_s"])
    assert a["tokens_per_step"] == 8 * 256 * 4
    t = a["training"]
    assert t["tokens_per_s_per_gpu"] == pytest.approx(a["tokens_per_s"] / 8)
    assert 0 < t["mfu"] < 1
    # more micro-batches amortise the bubble
    more = simulate(_r("workload.micro_batches=8")).summary["pipeline"]
    assert more["bubble_fraction"] < p["bubble_fraction"]


def test_gradient_accumulation_without_stages_repeats_the_micro_batches() -> None:
    """pp 1: the micro-batches run one after another, then the gradients once; the two
    sampled micro-batches' times repeat, so four micro-batches take twice two's."""
    two = simulate(_r("parallelism.pp=1", "parallelism.dp=2", "workload.micro_batches=2"))
    four = simulate(_r("parallelism.pp=1", "parallelism.dp=2"))
    p2, p4 = two.summary["pipeline"], four.summary["pipeline"]
    assert p4["bubble_s"] == pytest.approx(0.0, abs=1e-12)
    busy = p4["stages"][0]["busy_s"]
    assert four.summary["step_time_s"] == pytest.approx(busy + p4["stages"][0]["gradients_s"])
    assert busy == pytest.approx(2 * p2["stages"][0]["busy_s"], rel=1e-12)
    assert p4["stages"][0]["gradients_s"] == pytest.approx(p2["stages"][0]["gradients_s"])
    assert np.isfinite(four.summary["training"]["mfu"])


def test_a_layout_that_does_not_fit_names_its_fullest_stage() -> None:
    from moesim.errors import CapacityError

    r = _r("hardware=l40s-pcie", "workload.batch_size=64", "workload.seq_len=4096")
    with pytest.raises(CapacityError, match=r"pipeline stage 0 of 2 needs .* Add pipeline stages"):
        simulate(r)
