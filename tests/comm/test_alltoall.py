"""All-to-all algorithms: flows of each algorithm on hand-made exchanges, and invariants that
every registered algorithm keeps."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.comm.alltoall import ALL_TO_ALL, Exchange


def test_hierarchical_crosses_rdma_once_per_node() -> None:
    from moesim.comm.alltoall import Exchange, Flows, direct, hierarchical

    def rows(f: Flows) -> list[tuple[int, int, float]]:
        return sorted(zip(f.src.tolist(), f.dst.tolist(), f.nbytes.tolist(), strict=True))

    # 4 ranks on 2 nodes (ranks 0,1 on node 0; 2,3 on node 1). Rank 0 sends 10 tokens that
    # each need both GPUs of node 1: direct sends 10 to rank 2 and 10 to rank 3 over the
    # network; hierarchical sends 10 once to rank 2 (same rail) which forwards 10 to rank 3,
    # and copies the 10 for its own experts through its own channel buffers (8 -> 8).
    copies = np.zeros((4, 4), dtype=np.int64)
    copies[0, 2] = copies[0, 3] = 10
    node_copies = np.zeros((4, 2), dtype=np.int64)
    node_copies[0, 1] = 10
    ex = Exchange(copies, node_copies, np.array([0, 1, 8, 9]), np.array([0, 0, 1, 1]), copies, 10)
    d = direct(ex, 1.0)
    assert rows(d) == [
        (0, 8, 10.0),
        (0, 9, 10.0),
    ]
    h = hierarchical(ex, 1.0)
    assert rows(h) == [
        (0, 8, 10.0),
        (8, 8, 10.0),
        (8, 9, 10.0),
    ]
    back = h.reversed(2.0)
    assert rows(back) == [
        (8, 0, 20.0),
        (8, 8, 20.0),
        (9, 8, 20.0),
    ]


def test_hierarchical_copies_a_ranks_own_tokens_like_a_peers() -> None:
    from moesim.comm.alltoall import Exchange, direct, hierarchical

    # One node of 2 GPUs: rank 0 keeps 6 tokens for its own experts and sends 4 to rank 1.
    copies = np.array([[6, 4], [0, 0]], dtype=np.int64)
    ex = Exchange(copies, copies.sum(1, keepdims=True), np.arange(2), np.zeros(2, int), copies, 10)
    h, d = hierarchical(ex, 1.0), direct(ex, 1.0)
    assert sorted(zip(h.src.tolist(), h.dst.tolist(), h.nbytes.tolist(), strict=True)) == [
        (0, 0, 6.0),
        (0, 1, 4.0),
    ]
    assert (d.src.tolist(), d.dst.tolist()) == ([0], [1])  # NCCL's local copy is no flow


def test_pxn_relays_over_nvlink_to_the_destination_rail() -> None:
    from moesim.comm.alltoall import Exchange, Flows, pxn

    def rows(f: Flows) -> list[tuple[int, int, float]]:
        return sorted(zip(f.src.tolist(), f.dst.tolist(), f.nbytes.tolist(), strict=True))

    # 4 ranks on 2 nodes (GPUs 0, 1 | 8, 9). Rank 0 sends 10 tokens to rank 3 (GPU 9, rail 1)
    # and 5 to rank 1 (its own node); rank 1 sends 7 to rank 3 (its own rail).
    copies = np.zeros((4, 4), dtype=np.int64)
    copies[0, 3], copies[0, 1], copies[1, 3] = 10, 5, 7
    node_copies = np.zeros((4, 2), dtype=np.int64)
    ex = Exchange(copies, node_copies, np.array([0, 1, 8, 9]), np.array([0, 0, 1, 1]), copies, 10)
    f = pxn(ex, 1.0)
    # rank 0's 10 tokens hop to GPU 1 (rail 1) in one NVLink flow with its 5 local tokens;
    # GPU 1 sends its node's 17 tokens for GPU 9 in one RDMA stream, on rail 1
    assert rows(f) == [(0, 1, 15.0), (1, 9, 17.0)]
    inter = f.src // 8 != f.dst // 8
    assert (f.src[inter] % 8 == f.dst[inter] % 8).all()
    assert f.nbytes[inter].sum() == copies[:2, 2:].sum()


def test_allgather_and_low_latency_volumes() -> None:
    from moesim.comm.alltoall import Exchange, allgather, low_latency

    # Rank 0's 4 tokens each pick 2 experts on rank 1: 4 copies, 8 assignments.
    copies = np.array([[0, 4], [0, 0]])
    assignments = np.array([[0, 8], [0, 0]])
    ex = Exchange(
        copies,
        np.zeros((2, 1), dtype=int),
        np.array([0, 1]),
        np.zeros(2, dtype=int),
        assignments,
        tokens_per_rank=4,
    )
    ag = allgather(ex, 1.0)
    assert sorted(ag.nbytes.tolist()) == [4.0, 4.0] and not ag.via_nic  # both ways, all tokens
    ll = low_latency(ex, 1.0)
    assert ll.nbytes.tolist() == [8.0] and ll.via_nic  # one message per (token, expert)


def test_low_latency_goes_through_the_nics() -> None:
    from moesim.hardware.catalog import load_profile
    from moesim.hardware.topology import Topology

    topo = Topology(load_profile("h800"), 1)
    paths, _lat, private = topo.route(np.array([0]), np.array([1]), via_nic=True)
    names = [topo.link_names[i] for i in paths[0] if i >= 0]
    assert names[0] == "gpu0->leaf0" and names[-1] == "leaf1->gpu1"
    assert "leaf0->spine" in names  # crosses the spine between rails (loads, latency) ...
    # ... but a non-oversubscribed leaf uplink carries at most what its NICs send: it cannot
    # bind, so the max-min solver leaves it out, and the flow is isolated (nothing else on
    # the spine can slow it): its transfer is scheduled whole.
    fluid = [topo.link_names[i] for i in topo.fluid_paths(paths)[0] if i >= 0]
    assert fluid == ["gpu0->leaf0", "leaf1->gpu1"] and private
    over = load_profile("h800").model_copy(
        update={"fabric": load_profile("h800").fabric.model_copy(update={"oversubscription": 2})}
    )
    topo2 = Topology(over, 1)
    paths2, _lat, private2 = topo2.route(np.array([0]), np.array([1]), via_nic=True)
    assert not private2 and (topo2.fluid_paths(paths2) == paths2).all()  # it can bind


def _exchange(seed: int, ranks: int = 16, per_node: int = 8) -> Exchange:
    """A random deduplicated exchange on ``ranks`` GPUs of ``per_node`` per node."""
    rng = np.random.default_rng(seed)
    assignments = rng.integers(0, 40, size=(ranks, ranks))
    copies = np.minimum(assignments, rng.integers(0, 30, size=(ranks, ranks)))
    node = np.arange(ranks) // per_node
    node_copies = np.stack([copies[:, node == n].max(axis=1) for n in range(node.max() + 1)], 1)
    return Exchange(copies, node_copies, np.arange(ranks), node, assignments, tokens_per_rank=50)


@pytest.mark.parametrize("name", ALL_TO_ALL.names())
def test_every_all_to_all_sends_positive_bytes_between_gpus_of_the_group(name: str) -> None:
    algo = ALL_TO_ALL.get(name)
    for seed in range(3):
        ex = _exchange(seed)
        f = algo.dispatch(ex, 7.0)
        assert f.src.size and (f.nbytes > 0).all()
        # Only DeepEP's normal kernels move a rank's own tokens (through their buffers).
        assert (f.src != f.dst).all() or name == "hierarchical"
        assert np.isin(f.src, ex.rank_gpu).all() and np.isin(f.dst, ex.rank_gpu).all()
        back = algo.combine(ex, 7.0)
        assert np.array_equal(back.src, f.dst) and np.array_equal(back.dst, f.src)
        assert np.array_equal(back.nbytes, f.nbytes)


@pytest.mark.parametrize("name", ALL_TO_ALL.names())
def test_every_all_to_all_moves_at_least_what_each_node_must_receive(name: str) -> None:
    """Bytes entering each node from outside it cover the tokens it needs from other nodes,
    deduplicated per node (no algorithm can send less across the network)."""
    ex = _exchange(1)
    f = ALL_TO_ALL.get(name).dispatch(ex, 1.0)
    node = ex.rank_node
    for n in range(node.max() + 1):
        entering = f.nbytes[(node[f.dst] == n) & (node[f.src] != n)].sum()
        assert entering >= ex.node_copies[node != n, n].sum()


def test_only_the_low_latency_kernels_hold_no_sms() -> None:
    assert [n for n in ALL_TO_ALL.names() if not ALL_TO_ALL.get(n).holds_sms] == ["low_latency"]
