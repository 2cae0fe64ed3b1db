"""The timing engine end to end on small scenarios: bounds, critical path, conservation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from moesim.config.loading import load_scenario
from moesim.config.scenario import Routing
from moesim.models.spec import ModelSpec
from moesim.routing.batch import TokenBatch
from moesim.routing.catalog import SOURCES
from moesim.routing.sources import RoutingDraw
from moesim.runner import simulate
from tests.conftest import small_scenario


class _AllToExpertZero:
    """Every token picks experts 0 .. k-1 (all on rank 0 under contiguous placement)."""

    records_scores = False

    def __init__(self, cfg: Routing, model: ModelSpec, rng: np.random.Generator) -> None:
        self.model = model

    def scores(self, step: int, layers: np.ndarray, batch: TokenBatch, rng: Any) -> np.ndarray:
        raise NotImplementedError

    def expected_loads(self) -> np.ndarray:
        return np.ones((len(self.model.moe_layers), self.model.moe.num_experts))

    def draw(
        self, step: int, layers: np.ndarray, batch: TokenBatch, rng: Any, with_weights: bool
    ) -> RoutingDraw:
        k = self.model.moe.top_k
        shape = (len(layers), batch.ranks, batch.tokens_per_rank, k)
        experts = np.broadcast_to(np.arange(k), shape).copy()
        return RoutingDraw(experts, None)


@pytest.fixture
def hot_source(clean_registries: None) -> None:
    """The routing source ``test-hot`` (every token to experts 0 .. k-1), for one test."""
    SOURCES.register("test-hot")(_AllToExpertZero)


def run(write_scenario, **change: Any):
    return simulate(load_scenario(write_scenario(small_scenario(**change))))


def test_hot_expert_gpu_is_the_critical_path(write_scenario, hot_source: None) -> None:
    # Qwen3: 128 experts over 8 ranks; experts 0..7 all live on rank 0.
    res = run(write_scenario, model="qwen3-30b-a3b", **{"routing.source": "test-hot"})
    layers = res.layers[res.layers["moe"]]
    per_gpu = layers.groupby("gpu")[["expert_compute_s", "tokens_computed"]].sum()
    assert per_gpu["tokens_computed"].idxmax() == 0
    assert (per_gpu["tokens_computed"].iloc[1:] == 0).all()
    assert per_gpu["expert_compute_s"].idxmax() == 0
    # everyone else waits for GPU 0 at the combine
    assert res.summary["breakdown_s"]["straggler_wait"] > 0
    assert res.summary["imbalance_max_over_mean"] == pytest.approx(8.0)


def test_tokens_conserved_per_layer_and_step(write_scenario) -> None:
    res = run(
        write_scenario,
        **{
            "policies.capacity": {"type": "capacity", "factor": 0.8},
            "routing.generator": "zipf",
            "routing.skew": 1.5,
        },
    )
    col = res.collector
    computed = col.gpu_tokens.sum(axis=2)  # [steps, moe layers]
    assert (computed + col.dropped == col.routed).all()
    assert col.dropped.sum() > 0
    assert res.summary["drop_rate"] == pytest.approx(col.dropped.sum() / col.routed.sum())


def test_step_never_beats_physical_bounds(write_scenario) -> None:
    res = run(write_scenario, **{"workload.steps": 3})
    r = res.resolved
    m, hw = r.model, r.hardware
    # Every GPU reads at least its own expert weights once per MoE layer per step.
    weights = len(m.moe_layers) * m.expert_params * 2
    floor = weights / (hw.gpu.hbm_bandwidth_gb_per_s * 1e9)
    assert res.collector.step_time_s.min() > floor
    assert (res.layers.filter(like="_s") >= 0).all().all()


def test_train_step_costs_about_three_forward_passes(write_scenario) -> None:
    """Each expert GEMM's backward is an input-gradient and a weight-gradient GEMM of the same
    FLOPs; tile quantisation of the transposed shapes and the doubled memory-bound kernels
    keep the ratio near, not at, 3 (tests/timing/test_costs.py checks the shapes)."""
    fwd = run(
        write_scenario,
        model="olmoe-1b-7b",
        **{"workload": {"mode": "prefill", "batch_size": 8, "seq_len": 1024, "steps": 1}},
    )
    train = run(
        write_scenario,
        model="olmoe-1b-7b",
        **{"workload": {"mode": "train", "batch_size": 8, "seq_len": 1024, "steps": 1}},
    )
    ratio = (
        train.summary["breakdown_s"]["expert_compute"]
        / fwd.summary["breakdown_s"]["expert_compute"]
    )
    assert ratio == pytest.approx(3.0, rel=0.05)


def test_gradients_cross_the_all_to_all_in_their_own_dtype(write_scenario) -> None:
    """FP8 gradients halve the backward all-to-all bytes of BF16 ones (plus the scales); the
    forward phases do not change."""
    w = {"mode": "train", "batch_size": 8, "seq_len": 256, "steps": 1}
    bf = run(write_scenario, model="olmoe-1b-7b", **{"workload": w})
    fp = run(write_scenario, model="olmoe-1b-7b", **{"workload": {**w, "gradient_dtype": "fp8"}})
    # less the gradient reductions' bytes, which are the same in both (grad_reduce_dtype)
    dp = bf.summary["data_parallel"]["bytes_intra_node"]
    assert dp > 0 and dp == fp.summary["data_parallel"]["bytes_intra_node"]
    b_intra = bf.summary["bytes_intra_node"] - dp
    f_intra = fp.summary["bytes_intra_node"] - dp
    # forward dispatch + combine stay bf16 (2 of the 4 phases); backward goes to 1.03 bytes
    assert f_intra == pytest.approx(b_intra * (2 + 2 * (1 + 4 / 128) / 2) / 4, rel=1e-9)


def test_tensor_parallel_adds_allreduce(write_scenario) -> None:
    res = run(write_scenario, **{"parallelism": {"ep": 4, "tp": 2, "dp": 1}})
    assert res.summary["breakdown_s"]["tp_comm"] > 0


def test_does_not_fit_reports_numbers(write_scenario) -> None:
    from moesim.errors import CapacityError

    with pytest.raises(CapacityError, match=r"needs .* GiB of HBM per GPU but .* has"):
        run(write_scenario, **{"workload.context_len": 500_000})


def test_rebalancing_moves_experts_and_charges_the_network(write_scenario) -> None:
    res = run(
        write_scenario,
        model="olmoe-1b-7b",
        **{
            "workload.steps": 4,
            "routing.generator": "zipf",
            "policies.placement": {
                "type": "eplb",
                "redundant_experts": 8,
                "rebalance_every_steps": 2,
            },
        },
    )
    col, r = res.collector, res.resolved
    # step 0 starts from the expected loads; step 2 re-places from the observed ones
    assert col.migration_bytes[[0, 1, 3]].sum() == 0 and col.migration_bytes[2] > 0
    expert_bytes = r.model.expert_params * 2
    assert col.migration_bytes[2] % expert_bytes == 0  # whole experts move
    from moesim.metrics.collector import PHASES

    migrate = col.phase_s[:, 0, :, PHASES.index("migrate")]  # recorded on layer 0
    assert (migrate[2] > 0).all() and (migrate[[0, 1, 3]] == 0).all()
    # it cannot beat moving the bytes over the NVLink of the busiest receiver
    assert migrate[2].max() >= col.migration_bytes[2] / r.world / 450e9


def test_migration_copies_from_a_previous_holder() -> None:
    from moesim.policies.placement import Placement
    from moesim.routing.stage import migration_bytes

    old = Placement(phy2log=np.array([[0, 1, 2, 3]]), ranks=2)  # rank 0: 0, 1; rank 1: 2, 3
    new = Placement(phy2log=np.array([[0, 2, 1, 3]]), ranks=2)  # experts 1 and 2 swap ranks
    moved = migration_bytes(old, new, np.array([0, 0]), expert_bytes=10.0)
    assert moved.tolist() == [[0.0, 10.0], [10.0, 0.0]]


def test_shared_experts_overlap_the_dispatch(write_scenario) -> None:
    base = {"model": "deepseek-moe-16b", "workload.steps": 2}
    plain = run(write_scenario, **base)
    over = run(write_scenario, **base, **{"policies.overlap": {"shared_experts": True}})
    shared = plain.summary["breakdown_s"]["shared_expert"]
    assert shared > 0
    # overlapping the dispatch, the shared experts run on the SMs its kernels leave free
    slowed = over.summary["breakdown_s"]["sm_contention"]
    assert plain.summary["breakdown_s"]["sm_contention"] == 0
    assert slowed > 0
    assert over.summary["breakdown_s"]["shared_expert"] - shared == pytest.approx(slowed)
    saved = plain.summary["step_time_s"] - over.summary["step_time_s"]
    # at most the shared-expert time is hidden, and some of it is
    assert 0 < saved <= shared * plain.resolved.model.num_layers + 1e-12
    assert (
        over.summary["breakdown_s"]["exposed_comm"] < plain.summary["breakdown_s"]["exposed_comm"]
    )


def test_micro_batches_split_sequences_or_positions() -> None:
    from moesim.routing.batch import make_batch
    from moesim.routing.stage import micro_columns

    decode = make_batch(2, 4, 1, 100, first_seq=8)  # 4 sequences per rank, one token each
    assert [c.tolist() for c in micro_columns(decode, 4, 2)] == [[0, 1], [2, 3]]
    prefill = make_batch(2, 2, 3, 0)  # tokens are position-major: seq 0, 1 at pos 0, ...
    cols = micro_columns(prefill, 2, 2)
    assert [prefill.seq_id[0, c].tolist() for c in cols] == [[0, 0, 0], [1, 1, 1]]
    one_seq = make_batch(1, 1, 6, 0)  # a single sequence splits by position
    assert [one_seq.position[0, c].tolist() for c in micro_columns(one_seq, 1, 2)] == [
        [0, 1, 2],
        [3, 4, 5],
    ]


def _stage(write_scenario, **change: Any):
    from moesim.routing.stage import RoutingStage

    r = load_scenario(write_scenario(small_scenario(**change)))
    rng = np.random.default_rng(np.random.SeedSequence(r.scenario.seed).spawn(2)[0])
    return RoutingStage(r.scenario, r.model, r.gpus_per_node, rng)


def test_micro_batch_counts_add_up_to_the_step(write_scenario) -> None:
    # dropless: the two micro-batches' counts add up to the single-batch counts of the same draw
    one = _stage(write_scenario).step(0)
    two = _stage(write_scenario, **{"policies.overlap.micro_batches": 2}).step(0)
    assert len(two.micro) == 2 and not one.micro
    assert [m.batch.tokens_per_rank for m in two.micro] == [4, 4]
    for name in ("slot_tokens", "rank_copies", "assignments"):
        whole = getattr(one.replicas[0], name)
        parts = [getattr(m.replicas[0], name) for m in two.micro]
        assert np.array_equal(parts[0] + parts[1], whole), name
        assert np.array_equal(getattr(two.replicas[0], name), whole), name
        assert parts[0].sum() > 0 and parts[1].sum() > 0


def test_micro_batches_have_their_own_capacity(write_scenario, hot_source: None) -> None:
    cap = {"policies.capacity": {"type": "capacity", "factor": 1.0, "drop": "position"}}
    change = {"routing.source": "test-hot", **cap}
    one = _stage(write_scenario, **change).step(0)
    two = _stage(write_scenario, **change, **{"policies.overlap.micro_batches": 2}).step(0)
    # every token picks experts 0, 1: each keeps capacity = tokens * k / E assignments per
    # source rank; half the tokens get half the capacity, so the step keeps as many
    kept = lambda s: int(s.replicas[0].slot_tokens.sum())  # noqa: E731
    assert kept(two) == kept(one) > 0
    per_mb = [int(m.replicas[0].slot_tokens.sum()) for m in two.micro]
    assert per_mb[0] == per_mb[1] == kept(one) // 2


def _two_node_prefill(batch_size: int, seq_len: int) -> dict[str, Any]:
    """Qwen3 prefill over two H100 nodes (EP16): the all-to-all crosses the NICs."""
    return {
        "model": "qwen3-30b-a3b",
        "cluster.nodes": 2,
        "parallelism.ep": 16,
        "workload": {"mode": "prefill", "batch_size": batch_size, "seq_len": seq_len, "steps": 1},
    }


def test_two_batch_overlap_hides_communication(write_scenario) -> None:
    # Qwen3 prefill over two nodes: the all-to-all crosses the NICs and dominates
    base = _two_node_prefill(batch_size=32, seq_len=512)
    one = run(write_scenario, **base)
    two = run(write_scenario, **base, **{"policies.overlap.micro_batches": 2})
    b1, b2 = one.summary["breakdown_s"], two.summary["breakdown_s"]
    assert b1["exposed_comm"] > b1["expert_compute"]  # communication-bound
    assert two.summary["step_time_s"] < one.summary["step_time_s"]
    assert b2["exposed_comm"] < b1["exposed_comm"]
    # the step can hide communication, never compute: it still takes all the compute
    busy = two.summary["step_time_s"] - b2["exposed_comm"] - b2["straggler_wait"]
    assert busy >= b1["attention"] + b1["expert_compute"] - 1e-9
    assert one.summary["tokens_per_step"] == two.summary["tokens_per_step"]
    assert b2["sm_contention"] > 0 and b1["sm_contention"] == 0
    # each micro-batch's collectives are on the timeline, on its own row
    lanes = {e["args"].get("micro_batch", 0) for e in two.timeline if e["name"] == "dispatch"}
    assert lanes == {0, 1}


def test_two_batch_overlap_rereads_expert_weights_in_decode(write_scenario) -> None:
    # Mixtral decode is weight-read bound: each micro-batch reads the experts it uses again
    one = run(write_scenario)
    two = run(write_scenario, **{"policies.overlap.micro_batches": 2})
    e1 = one.summary["breakdown_s"]["expert_compute"]
    assert two.summary["breakdown_s"]["expert_compute"] > 1.5 * e1
    assert two.summary["step_time_s"] > one.summary["step_time_s"]


def test_compute_slows_while_communication_kernels_hold_sms() -> None:
    import simpy

    from moesim.timing.gpu import SharedSMStream

    env = simpy.Environment()
    stream = SharedSMStream(env, rate=0.5)
    spans: list[tuple[str, float, float]] = []
    done = stream.run([("a", 1.0), ("b", 0.5)], lambda *s: spans.append(s))

    def comm() -> Any:
        yield env.timeout(0.2)
        stream.comm_started()
        yield env.timeout(0.4)  # 0.4 s at half speed: 0.2 s of work
        stream.comm_ended()

    env.process(comm())
    env.run(done)
    assert spans == [("a", 0.0, pytest.approx(1.2)), ("b", pytest.approx(1.2), pytest.approx(1.7))]
    assert stream.slowed_s == pytest.approx(0.2)
    assert stream.busy_s == pytest.approx(1.7)


def test_low_latency_kernels_leave_the_sms_to_compute(write_scenario) -> None:
    base = {"policies.overlap": {"micro_batches": 2}}
    ll = run(write_scenario, **base, **{"policies.all_to_all": {"type": "low_latency"}})
    direct = run(write_scenario, **base)
    assert ll.summary["breakdown_s"]["sm_contention"] == 0
    assert direct.summary["breakdown_s"]["sm_contention"] > 0


def test_pxn_keeps_inter_node_traffic_on_its_rail(write_scenario) -> None:
    base = _two_node_prefill(batch_size=16, seq_len=256)
    direct = run(write_scenario, **base).summary
    pxn = run(write_scenario, **base, **{"policies.all_to_all": {"type": "pxn"}}).summary
    # the same tokens cross nodes once either way
    assert pxn["bytes_inter_node"] == pytest.approx(direct["bytes_inter_node"])
    assert direct["links"]["by_kind"]["spine"]["bytes_per_step"] > 0
    assert "spine" not in pxn["links"]["by_kind"]  # rail-aligned: leaf only
    # the relays add NVLink hops
    assert pxn["bytes_intra_node"] > direct["bytes_intra_node"]


def test_tp_allreduce_bytes_follow_the_compute_precision(write_scenario) -> None:
    from moesim.timing.plan import FlowBuilder, Layout
    from tests.conftest import small_scenario

    path = write_scenario(small_scenario(**{"parallelism": {"ep": 4, "tp": 2, "dp": 1}}))
    sizes = {}
    for dtype in ("fp32", "bf16", "fp8"):
        r = load_scenario(path, [f"workload.dtype={dtype}"])
        sizes[dtype] = FlowBuilder(r, Layout.of(r)).activation_bytes
    assert sizes == {"fp32": 4.0, "bf16": 2.0, "fp8": 2.0}  # was 2 bytes whatever the dtype
