"""The cluster network built from a hardware profile: links, capacities, latencies, paths.

Links are directed (one per direction) and carry ``capacity`` in bytes per second (line rate
times the profile's efficiency) and ``latency`` in seconds. The graph is a
``networkx.DiGraph`` (for inspection and drawing); paths follow fixed rules, computed on arrays:

- intra-node, ``nvswitch``: GPU -> NVSwitch -> GPU;
- intra-node, ``mesh``: the direct GPU -> GPU link (per-peer share of the GPU's links);
- intra-node, ``pcie``: GPU -> PCIe switch -> GPU, through the host bridge between switches;
- inter-node: GPU's NIC -> leaf -> GPU's NIC when both NICs hang off one leaf (same rail in a
  rail-optimised fabric, same node in a plain fat-tree), else NIC -> leaf -> spine -> leaf -> NIC.
  A leaf's uplink carries ``ports * NIC rate / oversubscription``.

A leaf uplink (or downlink) of a non-oversubscribed fabric can never bind: every flow on it
also crosses the NIC of one of the leaf's ports, so its load is at most the sum of those NICs'
capacities, which is its own. Such a link is *implied*: the feasible rates, and so the max-min
allocation, are the same without it. The max-min solver leaves implied links out
(:meth:`Topology.fluid_paths`, an exact reduction: half the incidence entries of an
inter-rail flow) while loads, latencies and privacy keep them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from moesim.hardware.profile import HardwareProfile

GB = 1e9
DENSE_LIMIT = 512


@dataclass
class _Links:
    names: list[str] = field(default_factory=list)
    capacity: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    ends: list[tuple[str, str]] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)

    def add(
        self, a: str, b: str, capacity: float, latency: float, kind: str, owner: int = -1
    ) -> int:
        self.owner.append(owner)
        self.names.append(f"{a}->{b}")
        self.capacity.append(capacity)
        self.latency.append(latency)
        self.kind.append(kind)
        self.ends.append((a, b))
        return len(self.names) - 1

    def add_array(
        self,
        n: int,
        a: str,
        b: str,
        cap: float,
        lat: float,
        kind: str,
        private: bool,
        group: int = 1,
    ) -> np.ndarray:
        """Add ``n`` links with ``{i}`` (the index) and ``{g}`` (``i // group``, e.g. the
        switch or node) formatted into the end names ``a`` and ``b``; a private link belongs
        to GPU ``i`` (only flows from or to that GPU use it)."""
        ids = []
        for i in range(n):
            names = (a.format(i=i, g=i // group), b.format(i=i, g=i // group))
            ids.append(self.add(*names, cap, lat, kind, i if private else -1))
        return np.array(ids, dtype=np.int64)


class Topology:
    """Links and path rules of ``nodes`` nodes of the profile's kind.

    Args:
        profile: The hardware profile.
        nodes: Nodes in the cluster.
    """

    MAX_HOPS = 4

    def __init__(self, profile: HardwareProfile, nodes: int) -> None:
        self.profile, self.nodes = profile, nodes
        node, fabric = profile.node, profile.fabric
        self.gpn = node.gpus_per_node
        self.gpus = nodes * self.gpn
        links = _Links()
        g = self.gpus
        if node.interconnect == "nvswitch":
            cap, lat = node.nvlink_gb_per_s * GB * node.nvlink_efficiency, node.nvlink_latency_s / 2
            gpn = self.gpn
            self._up = links.add_array(g, "gpu{i}", "nvswitch{g}", cap, lat, "nvlink", True, gpn)
            self._down = links.add_array(g, "nvswitch{g}", "gpu{i}", cap, lat, "nvlink", True, gpn)
        elif node.interconnect == "mesh":
            per_peer = node.nvlink_gb_per_s * GB * node.nvlink_efficiency / max(self.gpn - 1, 1)
            self._mesh = np.full((g, self.gpn), -1, dtype=np.int64)
            for src in range(g):
                base = (src // self.gpn) * self.gpn
                for j in range(self.gpn):
                    if base + j != src:
                        self._mesh[src, j] = links.add(
                            f"gpu{src}",
                            f"gpu{base + j}",
                            per_peer,
                            node.nvlink_latency_s,
                            "nvlink",
                            src,
                        )
        else:
            cap = node.pcie_gb_per_s * GB * node.pcie_efficiency
            lat = node.pcie_latency_s / 2
            self._n_sw = g // node.gpus_per_pcie_switch
            per_sw, sw_per_node = node.gpus_per_pcie_switch, self.gpn // node.gpus_per_pcie_switch
            self._up = links.add_array(g, "gpu{i}", "pcisw{g}", cap, lat, "pcie", True, per_sw)
            self._down = links.add_array(g, "pcisw{g}", "gpu{i}", cap, lat, "pcie", True, per_sw)
            self._sw_up = links.add_array(
                self._n_sw, "pcisw{i}", "host{g}", cap, lat, "pcie", False, sw_per_node
            )
            self._sw_down = links.add_array(
                self._n_sw, "host{g}", "pcisw{i}", cap, lat, "pcie", False, sw_per_node
            )
        self._implied: list[int] = []
        self._build_fabric(links, fabric.topology, fabric.oversubscription)
        self.link_names = links.names
        self.link_kind = np.array(links.kind)
        self.capacity = np.array(links.capacity, dtype=np.float64)
        self.latency = np.array(links.latency, dtype=np.float64)
        self.link_owner = np.array(links.owner, dtype=np.int64)
        self.implied = np.zeros(len(links.names), dtype=bool)
        self.implied[self._implied] = True
        self._ends = links.ends
        self._table: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._nic_table: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    # --- construction helpers -------------------------------------------------------------
    def _build_fabric(self, links: _Links, kind: str, oversub: float) -> None:
        node, fabric = self.profile.node, self.profile.fabric
        nic = node.nic_gb_per_s * GB * node.nic_efficiency
        self.inter_capable = nic > 0 and self.nodes > 1
        gpu = np.arange(self.gpus)
        self._leaf_of = gpu % self.gpn if kind == "rail_optimized" else gpu // self.gpn
        n_leaf = int(self._leaf_of.max()) + 1
        ports = self.gpus // n_leaf
        self._tx = np.array(
            [
                links.add(
                    f"gpu{i}", f"leaf{self._leaf_of[i]}", nic, fabric.latency_s / 2, "nic", int(i)
                )
                for i in gpu
            ],
            dtype=np.int64,
        )
        self._rx = np.array(
            [
                links.add(
                    f"leaf{self._leaf_of[i]}", f"gpu{i}", nic, fabric.latency_s / 2, "nic", int(i)
                )
                for i in gpu
            ],
            dtype=np.int64,
        )
        up_cap = ports * nic / oversub
        lat = fabric.spine_latency_s / 2
        self._leaf_up = links.add_array(n_leaf, "leaf{i}", "spine", up_cap, lat, "spine", False)
        self._leaf_down = links.add_array(n_leaf, "spine", "leaf{i}", up_cap, lat, "spine", False)
        if oversub <= 1:  # every port's NIC below covers it: never a bottleneck
            self._implied += [*self._leaf_up.tolist(), *self._leaf_down.tolist()]

    # --- queries --------------------------------------------------------------------------
    def node_of(self, gpu: np.ndarray) -> np.ndarray:
        """Node index of each GPU."""
        return np.asarray(gpu) // self.gpn

    def pair_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dense ``[gpus, gpus]`` tables of paths ``[.., MAX_HOPS]``, latency and privacy
        (computed once; for clusters up to :data:`DENSE_LIMIT` GPUs)."""
        if self._table is None:
            g = np.arange(self.gpus)
            src, dst = np.repeat(g, self.gpus), np.tile(g, self.gpus)
            paths = self._compute_paths(src, dst)
            lat = self.path_latency(paths)
            shape = (self.gpus, self.gpus)
            self._table = (
                paths.reshape(*shape, self.MAX_HOPS),
                lat.reshape(shape),
                self._owned(paths).all(axis=1).reshape(shape),
            )
        return self._table

    def nic_pair_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`pair_table` for paths through the NICs even inside a node (pure-RDMA
        kernels), computed once."""
        if self._nic_table is None:
            g = np.arange(self.gpus)
            paths = self._nic_paths(np.repeat(g, self.gpus), np.tile(g, self.gpus))
            shape = (self.gpus, self.gpus)
            self._nic_table = (
                paths.reshape(*shape, self.MAX_HOPS),
                self.path_latency(paths).reshape(shape),
                self._owned(paths).all(axis=1).reshape(shape),
            )
        return self._nic_table

    def paths(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """``[n, MAX_HOPS]`` int64 link ids of each src -> dst path, -1 padded.

        A GPU's path to itself is a loopback through its own switch port (up, then down) on
        NVSwitch and PCIe nodes, where a copy kernel's local copies share the port budget
        with its peers' (:func:`moesim.comm.alltoall.hierarchical`); it is empty on a mesh."""
        if self.gpus <= DENSE_LIMIT:
            return self.pair_table()[0][src, dst]
        return self._compute_paths(src, dst)

    def _compute_paths(self, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        out = np.full((src.size, self.MAX_HOPS), -1, dtype=np.int64)
        intra = self.node_of(src) == self.node_of(dst)
        self._intra_paths(src[intra], dst[intra], out, np.nonzero(intra)[0])
        inter = np.nonzero(~intra)[0]
        if inter.size:
            out[inter] = self._nic_paths(src[inter], dst[inter])
        return out

    def _nic_paths(self, s: np.ndarray, d: np.ndarray) -> np.ndarray:
        """``[n, MAX_HOPS]`` paths through the NICs: leaf, and the spine between leaves."""
        if not self.inter_capable and (self.node_of(s) != self.node_of(d)).any():
            raise ValueError("inter-node traffic but the profile has no NIC bandwidth")
        if self.profile.node.nic_gb_per_s <= 0:
            raise ValueError("traffic through the NICs but the profile has no NIC bandwidth")
        out = np.full((s.size, self.MAX_HOPS), -1, dtype=np.int64)
        same_leaf = self._leaf_of[s] == self._leaf_of[d]
        out[:, 0] = self._tx[s]
        out[:, 1] = np.where(same_leaf, self._rx[d], self._leaf_up[self._leaf_of[s]])
        out[:, 2] = np.where(same_leaf, -1, self._leaf_down[self._leaf_of[d]])
        out[:, 3] = np.where(same_leaf, -1, self._rx[d])
        return out

    def route(
        self, src: np.ndarray, dst: np.ndarray, via_nic: bool = False
    ) -> tuple[np.ndarray, np.ndarray, bool]:
        """Paths, ``[n]`` latencies and privacy (:meth:`private`) of flows ``src -> dst``;
        ``via_nic`` sends even same-node flows through the NICs (pure-RDMA kernels)."""
        if via_nic:
            if self.gpus <= DENSE_LIMIT:
                table, lat, owned = self.nic_pair_table()
                return table[src, dst], lat[src, dst], bool(owned[src, dst].all())
            paths = self._nic_paths(np.asarray(src), np.asarray(dst))
            return paths, self.path_latency(paths), bool(self._owned(paths).all())
        paths = self.paths(src, dst)
        return paths, self.latency_of(src, dst, paths), self.private(src, dst, paths)

    def _intra_paths(self, s: np.ndarray, d: np.ndarray, out: np.ndarray, rows: np.ndarray) -> None:
        kind = self.profile.node.interconnect
        if kind == "nvswitch":
            out[rows, 0], out[rows, 1] = self._up[s], self._down[d]
        elif kind == "mesh":
            out[rows, 0] = self._mesh[s, d % self.gpn]
        else:
            per = self.profile.node.gpus_per_pcie_switch
            same = s // per == d // per
            out[rows, 0] = self._up[s]
            out[rows, 1] = np.where(same, self._down[d], self._sw_up[s // per])
            out[rows, 2] = np.where(same, -1, self._sw_down[d // per])
            out[rows, 3] = np.where(same, -1, self._down[d])

    def private(self, src: np.ndarray, dst: np.ndarray, paths: np.ndarray) -> bool:
        """Whether every link of the flows' ``paths`` belongs to one GPU (the flow's source or
        destination), so that the flows can meet no other collective's traffic."""
        if self.gpus <= DENSE_LIMIT:
            return bool(self.pair_table()[2][src, dst].all())
        return bool(self._owned(paths).all())

    def _owned(self, paths: np.ndarray) -> np.ndarray:
        """Per hop: no link (-1), a GPU's own link, or an implied one (it never binds, so
        whoever else crosses it cannot slow these flows: :attr:`implied`)."""
        link = np.maximum(paths, 0)
        return (paths < 0) | (self.link_owner[link] >= 0) | self.implied[link]

    def fluid_paths(self, paths: np.ndarray) -> np.ndarray:
        """``paths`` without their implied links (-1 there): what the max-min model needs."""
        if not self.implied.any():
            return paths
        return np.where((paths >= 0) & self.implied[np.maximum(paths, 0)], -1, paths)

    def latency_of(self, src: np.ndarray, dst: np.ndarray, paths: np.ndarray) -> np.ndarray:
        """``[n]`` path latency of each flow, seconds."""
        if self.gpus <= DENSE_LIMIT:
            return self.pair_table()[1][src, dst]
        return self.path_latency(paths)

    def path_latency(self, paths: np.ndarray) -> np.ndarray:
        """``[n]`` seconds, the sum of link latencies along each path."""
        lat = np.where(paths >= 0, self.latency[np.maximum(paths, 0)], 0.0)
        return lat.sum(axis=1)

    def graph(self) -> nx.DiGraph:
        """The network as a directed graph; edges carry capacity (B/s), latency (s), kind."""
        g = nx.DiGraph()
        for i, (a, b) in enumerate(self._ends):
            g.add_edge(
                a,
                b,
                id=i,
                capacity=self.capacity[i],
                latency=self.latency[i],
                kind=self.link_kind[i],
            )
        return g
