"""Expert offload in the timing engine: cache decisions ahead of time, copies timed on PCIe.

The routing of every step is drawn first (the cache needs the whole access sequence for
Belady, and the oracle prefetcher the next layer's needs); :func:`moesim.policies.offload.
simulate_cache` then runs each GPU's cache. During the simulation, a GPU issues its copies of a
layer (demand misses, then the prefetches for the next layer in their order) when its gate has
run, so they overlap the dispatch; demand copies overtake queued prefetches; the layer's
expert compute waits for its demand copies and for the prefetched copies it uses
(``offload_wait``). Copies go one at a time
through the GPU's PCIe switch uplink to host memory (GPUs behind one switch share it) at the
profile's PCIe rate times its efficiency, plus its latency. Cache items are (MoE layer, logical
expert), so with re-placement (``rebalance_every_steps``) the experts a rank gains are misses
when first used: they come from host memory over PCIe, not from a peer over the network.

With ``miss: cpu`` a missing expert runs on the node's CPUs instead (Fiddler): its tokens go to
the host and back over PCIe, and the CPUs take max(weight bytes / host memory bandwidth,
FLOPs / host peak FLOP/s) per expert, one expert at a time per node, starting when the
dispatch has delivered the tokens and overlapping the GPU's own experts; the GPU computes only
the experts it holds. Host rates are the profile's peaks, so CPU times are lower bounds.
"""

from __future__ import annotations

import functools
from collections.abc import Generator
from typing import Any

import numpy as np
import simpy

from moesim.config.loading import ResolvedScenario
from moesim.policies.offload import (
    PREFETCHERS,
    CacheRun,
    PrefetchInput,
    affinity_transition,
    simulate_cache,
)
from moesim.routing.stage import RoutingStage, StepRouting
from moesim.timing.costs import ACT_BYTES
from moesim.timing.memory import cache_items, expert_bytes


class OffloadTiming:
    """Each GPU's cache run and its copies on the PCIe link.

    Args:
        r: The resolved scenario.
        stage: The routing stage (placement, co-activation sample).
        routings: Every step's routing, in order.
        replica / rank: ``[world]`` replica and EP rank of each GPU.
        env: The SimPy environment.
    """

    def __init__(
        self,
        r: ResolvedScenario,
        stage: RoutingStage,
        routings: list[StepRouting],
        replica: np.ndarray,
        rank: np.ndarray,
        env: simpy.Environment,
    ) -> None:
        off = r.scenario.policies.offload
        self.env, self.replica, self.rank = env, replica, rank
        self.n_moe = len(r.model.moe_layers)
        self.ep = r.scenario.parallelism.ep
        self.capacity = cache_items(r)
        self.bytes = expert_bytes(r)
        node = r.hardware.node
        self.copy_s = node.pcie_latency_s + self.bytes / (
            node.pcie_gb_per_s * 1e9 * node.pcie_efficiency
        )
        self.gpus_per_switch = node.gpus_per_pcie_switch
        self.links: dict[int, simpy.PriorityResource] = {}
        self.spr = stage.slots_per_rank
        self.on_cpu = off.miss == "cpu"
        self.gpus_per_node = r.gpus_per_node
        self.cpus: dict[int, simpy.Resource] = {}
        self.cpu_s: dict[tuple[int, int], np.ndarray] = {}
        self.activation_bytes = 0.0
        prefetcher = PREFETCHERS.get(off.prefetch)
        transition = functools.cache(
            lambda: affinity_transition(stage.coactivation()[1], r.model.moe.top_k)
        )
        self.runs: dict[tuple[int, int], CacheRun] = {}
        # cache items are (MoE layer, logical expert): m * E + e, so that a re-placement that
        # gives a rank new experts makes them misses; held[t][item] = the rank's slots of it
        self.held: dict[tuple[int, int], list[dict[int, list[int]]]] = {}
        n_exp = r.model.moe.num_experts
        for rep in range(r.scenario.parallelism.dp):
            for rk in range(self.ep):
                held, loads, maps = self._accesses(routings, stage, rep, rk, n_exp)
                needed = [list(at) for at in held]
                prefetch = prefetcher(
                    PrefetchInput(needed, loads, maps, self.n_moe, n_exp, transition)
                )
                run = simulate_cache(
                    needed, prefetch, self.capacity, off.policy, admit=not self.on_cpu
                )
                self.runs[(rep, rk)] = run
                self.held[(rep, rk)] = held
                if self.on_cpu:
                    tokens = self._host_tokens(routings, rep, rk, held, run)
                    self.cpu_s[(rep, rk)] = np.array([self._cpu_seconds(r, n) for n in tokens])
                    self.activation_bytes += sum(sum(n) for n in tokens) * self._token_bytes(r)
        self._pending: dict[tuple[int, int, int], simpy.Event | None] = {}

    def _accesses(
        self, routings: list[StepRouting], stage: RoutingStage, rep: int, rk: int, n_exp: int
    ) -> tuple[list[dict[int, list[int]]], list[np.ndarray], list[np.ndarray]]:
        """One cache's accesses (one per step and MoE layer): ``held[t][item]`` the rank's
        slots of each item it needs, ``loads[t]`` tokens per expert, ``maps[t]`` its slots'
        experts ``[moe_layers, slots]``."""
        spr = self.spr
        held: list[dict[int, list[int]]] = []
        loads, maps = [], []
        for sr in routings:
            c = sr.replicas[rep]
            p2l = (sr.placement or stage.placement).phy2log[:, rk * spr : (rk + 1) * spr]
            for m in range(self.n_moe):
                at: dict[int, list[int]] = {}
                for s in np.nonzero(c.slot_tokens[m, rk])[0]:
                    at.setdefault(m * n_exp + int(p2l[m, s]), []).append(int(s))
                held.append(at)
                loads.append(c.expert_routed[m])
                maps.append(p2l)
        return held, loads, maps

    def _host_tokens(
        self,
        routings: list[StepRouting],
        rep: int,
        rk: int,
        held: list[dict[int, list[int]]],
        run: CacheRun,
    ) -> list[list[int]]:
        """Tokens of each expert the host CPUs run at each access (the missed ones)."""
        visits = [(sr, m) for sr in routings for m in range(self.n_moe)]
        return [
            [
                sum(int(sr.replicas[rep].slot_tokens[m, rk, s]) for s in held[t][i])
                for i in run.missed[t]
            ]
            for t, (sr, m) in enumerate(visits)
        ]

    @staticmethod
    def _token_bytes(r: ResolvedScenario) -> float:
        """PCIe bytes one token takes to the host and back (bf16 activations)."""
        return 2 * r.model.hidden_size * ACT_BYTES

    def _cpu_seconds(self, r: ResolvedScenario, tokens: list[int]) -> float:
        """Host seconds for the missed experts of one layer visit, ``tokens`` each."""
        node, tp = r.hardware.node, r.scenario.parallelism.tp
        assert node.host_memory_gb_per_s is not None and node.host_tflops is not None
        pcie = node.pcie_gb_per_s * 1e9 * node.pcie_efficiency
        total = 0.0
        for n in tokens:
            weights = self.bytes / (node.host_memory_gb_per_s * 1e9)
            math = 2.0 * n * r.model.expert_params / tp / (node.host_tflops * 1e12)
            total += max(weights, math) + n * self._token_bytes(r) / pcie + 2 * node.pcie_latency_s
        return total

    def gpu_slots(self, step: int, world: int) -> np.ndarray | None:
        """``[moe_layers, world, slots]`` True where GPU ``g`` computes the slot itself; None
        when GPUs compute every slot (misses are copied, not run on the CPUs)."""
        if not self.on_cpu:
            return None
        mask = np.ones((self.n_moe, world, self.spr), dtype=bool)
        for g in range(world):
            key = (int(self.replica[g]), int(self.rank[g]))
            run, held = self.runs[key], self.held[key]
            for m in range(self.n_moe):
                t = step * self.n_moe + m
                for item in run.missed[t]:
                    mask[m, g, held[t][item]] = False
        return mask

    def cpu(self, g: int, step: int, moe: int) -> simpy.Event | None:
        """Run ``g``'s missed experts of MoE layer ``moe`` on its node's CPUs; the event at
        their end (None when there are none)."""
        if not self.on_cpu:
            return None
        key = (int(self.replica[g]), int(self.rank[g]))
        seconds = float(self.cpu_s[key][step * self.n_moe + moe])
        if seconds <= 0:
            return None
        node = g // self.gpus_per_node
        if node not in self.cpus:
            self.cpus[node] = simpy.Resource(self.env, 1)

        def work() -> Generator[simpy.Event, Any, None]:
            with self.cpus[node].request() as req:
                yield req
                yield self.env.timeout(seconds)

        return self.env.process(work())

    def run_of(self, g: int) -> CacheRun:
        """The cache run of GPU ``g``'s EP rank."""
        return self.runs[(int(self.replica[g]), int(self.rank[g]))]

    def _copy(self, g: int, priority: int) -> Generator[simpy.Event, Any, None]:
        """One expert copy; demand copies (priority 0) go before queued prefetches (1)."""
        sw = g // self.gpus_per_switch
        if sw not in self.links:
            self.links[sw] = simpy.PriorityResource(self.env, 1)
        with self.links[sw].request(priority=priority) as req:
            yield req
            yield self.env.timeout(self.copy_s)

    def issue(self, g: int, step: int, moe: int) -> simpy.Event:
        """Start ``g``'s copies at MoE layer ``moe`` of ``step``; the event its expert compute
        waits for (demand copies, and the used prefetches issued for this layer)."""
        run, t = self.run_of(g), step * self.n_moe + moe
        waits: list[simpy.Event] = [
            self.env.process(self._copy(g, 0)) for _ in range(int(run.demand[t]))
        ]
        earlier = self._pending.pop((g, step, moe), None)
        if earlier is not None:
            waits.append(earlier)
        last_used = None
        for used in run.prefetch_used[t]:
            p = self.env.process(self._copy(g, 1))
            if used:
                last_used = p
        nxt = (step, moe + 1) if moe + 1 < self.n_moe else (step + 1, 0)
        self._pending[(g, *nxt)] = last_used
        return self.env.all_of(waits)

    def stats(self, steps: int) -> dict[str, Any]:
        """Hit rate, copies and bytes over PCIe per step (all GPUs' caches, one per EP rank)."""
        hits = sum(int(r.hits.sum()) for r in self.runs.values())
        acc = sum(int(r.accesses.sum()) for r in self.runs.values())
        demand = sum(int(r.demand.sum()) for r in self.runs.values())
        pre = sum(len(x) for r in self.runs.values() for x in r.prefetch_used)
        useful = sum(sum(x) for r in self.runs.values() for x in r.prefetch_used)
        copies = demand + pre
        tp = len(self.replica) // max(len(self.runs), 1)
        cpu = sum(len(m) for r in self.runs.values() for m in r.missed) if self.on_cpu else 0
        pcie = copies * self.bytes * tp + self.activation_bytes * tp
        return {
            "cache_experts": self.capacity,
            "hit_rate": hits / acc if acc else 1.0,
            "demand_copies_per_step": demand / steps,
            "prefetch_copies_per_step": pre / steps,
            "prefetch_useful": useful / pre if pre else 0.0,
            "cpu_experts_per_step": cpu / steps,
            "cpu_s_per_step": sum(float(c.sum()) for c in self.cpu_s.values()) / steps,
            "pcie_bytes_per_step": pcie / steps,
        }
