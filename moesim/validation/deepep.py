"""DeepEP V1 normal kernels (deepseek-ai/DeepEP README; ../shared/validation/published.md §1).

Published setup: H800, 8 GPUs per node on NVLink (~160 GB/s), one CX7 400 Gb/s NIC per GPU;
4096 tokens per GPU, hidden 7168, 256 experts, top-8, FP8 dispatch, BF16 combine. Routing as in
DeepEP's tests: scores ``|randn| + 1``; with several nodes a group is one node's experts, a
token keeps its ``min(nodes, 4)`` best nodes (group score: the node's best expert) and its 8
best experts there. Intranode (EP8) uses NVLink only; internode (EP16/32/64) uses the
hierarchical kernels (RDMA once per node, then NVLink).

Bytes are counted as DeepEP's tests count them ("logical" bandwidth):

- intranode: tokens a rank *receives* (one copy per token and rank, its own tokens included)
  times the token's bytes;
- internode: (token, destination node) pairs a rank sends, deduplicated per node and *counting
  its own node*, times the token's bytes;
- FP8 token bytes are ``hidden * (1 + 4/128)``, BF16 ``hidden * 2``.

The prediction is those bytes over the rank's simulated phase time (the time its last flow
arrives), averaged over ranks. Nothing here is tuned to the published figures: the hardware
facts come from the shipped ``h800`` profile.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import simpy

from moesim.comm.alltoall import ALL_TO_ALL, Exchange, Flows
from moesim.dtypes import token_bytes
from moesim.hardware.catalog import load_profile
from moesim.hardware.topology import Topology
from moesim.policies.placement import make_placement, simple_input
from moesim.policies.replicas import REPLICA_CHOICES
from moesim.routing.dispatch import CapacityRule, LayerCounts, count_layers
from moesim.routing.sources import RoutingDraw, group_limited_topk
from moesim.timing.network import FlowNetwork

HIDDEN, EXPERTS, TOP_K, TOKENS = 7168, 256, 8, 4096
# (kind, EP, published dispatch GB/s, published combine GB/s)
PUBLISHED = [
    ("intranode", 8, 153.0, 158.0),
    ("internode", 16, 43.0, 43.0),
    ("internode", 32, 58.0, 57.0),
    ("internode", 64, 51.0, 50.0),
]


@dataclass(frozen=True)
class Row:
    """One line of the comparison."""

    kind: str
    ep: int
    phase: str
    bottleneck: str
    published_gb_per_s: float
    predicted_gb_per_s: float
    predicted_time_us: float

    @property
    def error(self) -> float:
        """Relative error of the prediction."""
        return self.predicted_gb_per_s / self.published_gb_per_s - 1.0

    def as_dict(self) -> dict[str, object]:
        """JSON-ready, with the error."""
        return {**asdict(self), "error": self.error}


def routing_counts(ep: int, rng: np.random.Generator, tokens: int = TOKENS) -> LayerCounts:
    """The benchmark's routing for ``ep`` ranks, counted per rank and per node."""
    nodes = max(ep // 8, 1)
    topk = group_limited_topk(
        tokens * ep, EXPERTS, TOP_K, nodes, min(nodes, 4), rng, group_score="max"
    )
    draw = RoutingDraw(topk.reshape(1, ep, tokens, TOP_K), None)
    placement = make_placement("contiguous", simple_input(np.ones((1, EXPERTS)), ep))
    rule = CapacityRule(factor=None, drop="position", num_experts=EXPERTS, top_k=TOP_K)
    chooser = REPLICA_CHOICES.get("round_robin")(placement, EXPERTS, np.arange(ep) // 8)
    return count_layers(draw, np.arange(1), placement, chooser, rule, np.arange(ep) // 8)


def phase_times(topo: Topology, ep: int, flows: Flows, tolerance: float) -> np.ndarray:
    """``[ep]`` seconds until each rank's last flow of the phase arrives (an isolated
    transfer: per-link sharing, as in a scenario; ``tolerance`` where links are shared)."""
    env = simpy.Environment()
    net = FlowNetwork(env, topo, tolerance, sharing=True)
    done = np.zeros(ep)
    net.transfer(flows, np.arange(ep), lambda g, t: done.__setitem__(g, t))
    env.run()
    return done


def predict(
    kind: str,
    ep: int,
    published: tuple[float, float],
    seed: int = 0,
    tolerance: float = 0.02,
    profile: str = "h800",
) -> list[Row]:
    """Predicted dispatch and combine bottleneck bandwidth of one table row."""
    topo = Topology(load_profile(profile), max(ep // 8, 1))
    counts = routing_counts(ep, np.random.default_rng(seed))
    gpus = np.arange(ep)
    ex = Exchange(
        copies=counts.rank_copies[0],
        node_copies=counts.node_copies[0],
        rank_gpu=gpus,
        rank_node=gpus // 8,
        assignments=counts.assignments[0],
        tokens_per_rank=TOKENS,
    )
    algorithm = ALL_TO_ALL.get("hierarchical").dispatch  # on one node: NVLink only
    if kind == "intranode":
        tokens_counted = ex.copies.sum(axis=0)  # received per rank, own tokens included
        bottleneck = "NVLink"
    else:
        tokens_counted = ex.node_copies.sum(axis=1)  # (token, node) pairs, own node included
        bottleneck = "RDMA"
    rows = []
    for phase, dtype, pub in (("dispatch", "fp8", published[0]), ("combine", "bf16", published[1])):
        tb = token_bytes(HIDDEN, dtype)
        flows = algorithm(ex, tb)
        if phase == "combine":
            flows = flows.reversed()
        times = phase_times(topo, ep, flows, tolerance)
        bw = float(np.mean(tokens_counted * tb / times)) / 1e9
        rows.append(Row(kind, ep, phase, bottleneck, pub, bw, float(times.max() * 1e6)))
    return rows


def validate_deepep(seed: int = 0, tolerance: float = 0.02) -> list[Row]:
    """Every row of the DeepEP normal-kernel table, predicted."""
    rows: list[Row] = []
    for kind, ep, dispatch, combine in PUBLISHED:
        rows += predict(kind, ep, (dispatch, combine), seed, tolerance)
    return rows
