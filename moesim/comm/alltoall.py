"""All-to-all algorithms: from deduplicated token counts to point-to-point flows.

An algorithm is a pure function ``(exchange: Exchange, token_bytes: float) -> Flows`` giving the
flows of the *dispatch* direction (tokens to their experts); the combine direction sends the
same amounts back, so callers reverse each flow (:meth:`Flows.reversed`).

- ``direct``: NCCL's pairwise exchange, one flow per ordered pair of GPUs that exchange tokens;
  a token goes once to every GPU holding one of its experts.
- ``allgather``: Megatron's all-gather dispatcher: every rank gathers every other rank's
  tokens (and reduce-scatters the outputs on combine), whatever their experts.
- ``low_latency``: DeepEP's low-latency (decode) kernels: pure RDMA, one message per token and
  expert (no deduplication), GPUs of the same node included; each flow pays the NIC path
  latency.
- ``hierarchical``: DeepEP's normal kernels. A token crosses the network once per destination
  node, to the GPU of the same local rank there (same rail), which forwards it over NVLink to
  the GPUs of that node that hold its experts; tokens for GPUs of the own node go straight over
  NVLink. The two stages are pipelined by DeepEP, so their flows run concurrently here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moesim.jit import kernel
from moesim.registry import Registry


@dataclass(frozen=True)
class Flows:
    """Point-to-point transfers of one collective phase.

    Attributes:
        src: ``[n]`` int64 source GPU.
        dst: ``[n]`` int64 destination GPU.
        nbytes: ``[n]`` float64 bytes.
    """

    src: np.ndarray
    dst: np.ndarray
    nbytes: np.ndarray
    via_nic: bool = False

    def reversed(self, scale: float = 1.0) -> Flows:
        """The same flows in the opposite direction, bytes times ``scale`` (the arrays are
        shared: flows are not changed in place)."""
        nbytes = self.nbytes if scale == 1.0 else self.nbytes * scale
        return Flows(src=self.dst, dst=self.src, nbytes=nbytes, via_nic=self.via_nic)


@dataclass(frozen=True)
class PairFlows:
    """A pairwise all-to-all phase (:func:`pairwise`) as its count matrix: a flow of
    ``counts[s, d] * token_bytes`` from ``gpus[s]`` to ``gpus[d]`` for each non-zero entry
    off the diagonal, each in the opposite direction with ``reverse``."""

    counts: np.ndarray
    gpus: np.ndarray
    token_bytes: float
    reverse: bool
    via_nic: bool

    def flows(self) -> Flows:
        """The same flows, built."""
        f = _pairs(self.counts, self.gpus, self.gpus, self.token_bytes)
        f = Flows(f.src, f.dst, f.nbytes, via_nic=self.via_nic)
        return f.reversed() if self.reverse else f


def moved_bytes(
    src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, gpn: int, gpus: int
) -> tuple[np.ndarray, float, float]:
    """``[gpus]`` bytes each GPU sends to another, and the bytes between nodes and within
    nodes, of flows ``src -> dst`` (a GPU's copies to itself left out)."""
    moved = src != dst
    src, dst, nbytes = src[moved], dst[moved], nbytes[moved]
    inter = src // gpn != dst // gpn
    sent = np.bincount(src, weights=nbytes, minlength=gpus)
    return sent, float(nbytes[inter].sum()), float(nbytes[~inter].sum())


@dataclass(frozen=True)
class Exchange:
    """Who sends how many tokens to whom in one EP group.

    Attributes:
        copies: ``[ranks, ranks]`` int, tokens rank ``s`` sends to rank ``d`` (deduplicated
            per destination rank; the diagonal stays local).
        node_copies: ``[ranks, nodes]`` int, tokens rank ``s`` sends to node ``n``
            (deduplicated per destination node).
        rank_gpu: ``[ranks]`` GPU of each rank.
        rank_node: ``[ranks]`` node index (the columns of ``node_copies``) of each rank.
        assignments: ``[ranks, ranks]`` int, token-expert assignments from ``s`` to ``d``
            (not deduplicated).
        tokens_per_rank: Tokens each rank holds before the exchange.
    """

    copies: np.ndarray
    node_copies: np.ndarray
    rank_gpu: np.ndarray
    rank_node: np.ndarray
    assignments: np.ndarray
    tokens_per_rank: int


AllToAllFn = Callable[[Exchange, float], Flows]


@dataclass(frozen=True)
class AllToAll:
    """An all-to-all algorithm with its traits: adding one is one of these in this registry.

    Attributes:
        flows: The dispatch direction's flows (tokens to their experts).
        holds_sms: Its kernels run on the GPU's SMs while in flight (``gpu.comm_sms`` of the
            profile), slowing compute that overlaps them. DeepEP's low-latency kernels post
            RDMA writes and receive through a hook, "without occupying any SM resource"
            (DeepEP README); NCCL and DeepEP's normal kernels are copy kernels on SMs.
        fixed: Which fixed cost of the profile's ``kernels.collectives`` each call pays before
            its bytes move: ``nccl_launch`` (NCCL), ``deepep_notify`` (DeepEP normal kernels'
            notify/layout handshake with its host synchronisation), or none (DeepEP's
            low-latency kernels, CUDA-graph compatible).
        reads_copies: Its flows read the exchange's deduplicated counts (``copies``,
            ``node_copies``); the routing stage counts them only then.
        pairs: For an algorithm whose flows are one per non-zero entry of a ``[rank, rank]``
            count matrix (tokens times the token's bytes, between the ranks' GPUs, none to
            itself: :func:`pairwise`), that matrix of an exchange; a network can then
            schedule the phase from it without building the flows.
        via_nic: Its flows go through the NICs even inside a node (pure RDMA).
    """

    flows: AllToAllFn
    holds_sms: bool = True
    fixed: str | None = "nccl_launch"
    reads_copies: bool = True
    pairs: Callable[[Exchange], np.ndarray] | None = None
    via_nic: bool = False

    def dispatch(self, ex: Exchange, token_bytes: float) -> Flows:
        """Tokens to their experts."""
        return self.flows(ex, token_bytes)

    def combine(self, ex: Exchange, token_bytes: float) -> Flows:
        """Expert outputs back to their tokens: the dispatch's flows reversed."""
        return self.flows(ex, token_bytes).reversed()


ALL_TO_ALL: Registry[AllToAll] = Registry("all-to-all")


def algorithm(
    name: str, holds_sms: bool = True, fixed: str | None = "nccl_launch", reads_copies: bool = True
) -> Callable[[AllToAllFn], AllToAllFn]:
    """Decorator: register a flows function as the all-to-all ``name`` with its traits."""

    def deco(fn: AllToAllFn) -> AllToAllFn:
        ALL_TO_ALL.register(name)(AllToAll(fn, holds_sms, fixed, reads_copies))
        return fn

    return deco


COMPILED_MIN_ENTRIES = 64 * 64
"""Count matrices from this size on are read by a compiled loop (a 256-GPU decode phase's
65,280 flows: ~0.2 ms instead of ~1 ms); smaller ones by numpy, which needs no numba."""


def pairwise(
    name: str,
    holds_sms: bool = True,
    fixed: str | None = "nccl_launch",
    reads_copies: bool = True,
    via_nic: bool = False,
) -> Callable[[Callable[[Exchange], np.ndarray]], AllToAllFn]:
    """Decorator: register the all-to-all ``name`` whose flows are one per non-zero entry
    of the ``[rank, rank]`` token counts the decorated function picks from an exchange."""

    def deco(counts: Callable[[Exchange], np.ndarray]) -> AllToAllFn:
        def flows(ex: Exchange, token_bytes: float) -> Flows:
            f = _pairs(counts(ex), ex.rank_gpu, ex.rank_gpu, token_bytes)
            return Flows(f.src, f.dst, f.nbytes, via_nic=via_nic)

        flows.__doc__ = counts.__doc__
        ALL_TO_ALL.register(name)(
            AllToAll(flows, holds_sms, fixed, reads_copies, pairs=counts, via_nic=via_nic)
        )
        return flows

    return deco


def _pairs(
    counts: np.ndarray, src_gpu: np.ndarray, dst_gpu: np.ndarray, tb: float, own: bool = False
) -> Flows:
    """Flows for the non-zero entries of a ``[src, dst]`` count matrix; a GPU's entry to
    itself only when ``own`` (a copy kernel that moves its own tokens like a peer's).
    Compiled from :data:`COMPILED_MIN_ENTRIES` entries on (the same flows)."""
    pairs = (
        kernel("moesim.comm._pairs_jit", "pairs") if counts.size >= COMPILED_MIN_ENTRIES else None
    )
    if pairs is not None:
        src, dst, nbytes = pairs(
            np.ascontiguousarray(counts),
            np.asarray(src_gpu, dtype=np.int64),
            np.asarray(dst_gpu, dtype=np.int64),
            float(tb),
            own,
        )
        return Flows(src=src, dst=dst, nbytes=nbytes)
    s, d = np.nonzero(counts)
    if not own:
        off = src_gpu[s] != dst_gpu[d]
        s, d = s[off], d[off]
    return Flows(src=src_gpu[s], dst=dst_gpu[d], nbytes=counts[s, d] * float(tb))


def _concat(parts: list[Flows]) -> Flows:
    return Flows(
        src=np.concatenate([p.src for p in parts]),
        dst=np.concatenate([p.dst for p in parts]),
        nbytes=np.concatenate([p.nbytes for p in parts]),
    )


@algorithm("allgather")
def allgather(ex: Exchange, token_bytes: float) -> Flows:
    """All-gather: every rank receives all ``tokens_per_rank`` tokens of every other rank."""
    everyone = np.full(ex.copies.shape, ex.tokens_per_rank)
    return _pairs(everyone, ex.rank_gpu, ex.rank_gpu, token_bytes)


@pairwise("low_latency", holds_sms=False, fixed=None, reads_copies=False, via_nic=True)
def low_latency(ex: Exchange) -> np.ndarray:
    """Per-expert RDMA messages between every pair of ranks, over the NICs."""
    return ex.assignments


@pairwise("direct")
def direct(ex: Exchange) -> np.ndarray:
    """Pairwise exchange: rank ``s`` sends ``copies[s, d]`` tokens straight to rank ``d``."""
    return ex.copies


def rdma_peer(rank_node: np.ndarray) -> np.ndarray:
    """``[ranks, nodes]`` the rank on node ``n`` that receives rank ``s``'s RDMA traffic: the
    one with the same position inside its node (same rail)."""
    nodes = int(rank_node.max()) + 1
    members = [np.nonzero(rank_node == n)[0] for n in range(nodes)]
    pos = np.zeros(rank_node.size, dtype=np.int64)
    for m in members:
        pos[m] = np.arange(m.size)
    peer = np.empty((rank_node.size, nodes), dtype=np.int64)
    for n, m in enumerate(members):
        peer[:, n] = m[pos % m.size]
    return peer


@algorithm("hierarchical", fixed="deepep_notify")
def hierarchical(ex: Exchange, token_bytes: float) -> Flows:
    """DeepEP normal kernels: RDMA once per destination node, then NVLink forwarding.

    A rank's tokens for its own experts, and those a forwarder relays to itself, go through
    the same channel buffers and copy warps as a peer's (DeepEP ``csrc/kernels/intranode.cu``
    and ``internode.cu``: the senders write ``buffer_ptrs[responsible_rank]`` for every rank of
    the node, their own included), so they are flows from the GPU to itself, which take their
    share of its NVLink port (:meth:`moesim.hardware.topology.Topology.paths`): the port is
    what bounds these kernels on H800 (DeepEP issue #285: at EP16 "the NVLink bandwidth will
    exceed 140 GB/s, making NVLink the bottleneck"). RDMA to the own node is a local copy."""
    node = ex.rank_node
    same = node[:, None] == node[None, :]
    local = _pairs(np.where(same, ex.copies, 0), ex.rank_gpu, ex.rank_gpu, token_bytes, own=True)
    peer = rdma_peer(node)  # [ranks, nodes]
    remote_nodes = np.where(
        np.arange(ex.node_copies.shape[1])[None, :] == node[:, None], 0, ex.node_copies
    )
    s, n = np.nonzero(remote_nodes)
    rdma = Flows(
        src=ex.rank_gpu[s],
        dst=ex.rank_gpu[peer[s, n]],
        nbytes=remote_nodes[s, n] * float(token_bytes),
    )
    # Forwarding inside each destination node: the peer relays s's tokens to every rank d.
    fwd = np.where(same, 0, ex.copies)  # [s, d] tokens crossing nodes
    s, d = np.nonzero(fwd)
    relay = peer[s, node[d]]
    ranks = ex.copies.shape[0]
    per_pair = np.bincount(relay * ranks + d, weights=fwd[s, d], minlength=ranks * ranks)
    forward = _pairs(per_pair.reshape(ranks, ranks), ex.rank_gpu, ex.rank_gpu, token_bytes, True)
    return _concat([local, rdma, forward])


@algorithm("pxn")
def pxn(ex: Exchange, token_bytes: float) -> Flows:
    """NCCL's all-to-all with PXN (PCI x NVLink, on by default since NCCL 2.12 on
    rail-optimised fabrics): a token for another node first crosses NVLink to the GPU of its
    own node on the destination's rail, which sends what its node has for that destination in
    one RDMA stream over its NIC; the inter-node traffic never leaves its rail. NVLink
    transfers between one pair of GPUs (direct and relayed) form one flow."""
    node = ex.rank_node
    ranks = ex.copies.shape[0]
    same = node[:, None] == node[None, :]
    peer = rdma_peer(node)  # [ranks, nodes]: the rank of each node on a rank's rail
    cross = np.where(same, 0, ex.copies)
    s, d = np.nonzero(cross)
    relay = peer[d, node[s]]  # in the source's node, on the destination's rail
    nv = np.where(same, ex.copies, 0).astype(np.float64).ravel()
    nv += np.bincount(s * ranks + relay, weights=cross[s, d], minlength=ranks * ranks)
    nvlink = _pairs(nv.reshape(ranks, ranks), ex.rank_gpu, ex.rank_gpu, token_bytes)
    rdma = np.bincount(relay * ranks + d, weights=cross[s, d], minlength=ranks * ranks)
    wire = _pairs(rdma.reshape(ranks, ranks), ex.rank_gpu, ex.rank_gpu, token_bytes)
    return _concat([nvlink, wire])
