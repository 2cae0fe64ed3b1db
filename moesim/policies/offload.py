"""Expert offload: experts live in host memory, an HBM cache holds some of them.

Each EP rank (of each data-parallel replica) has its own cache of ``capacity`` expert copies,
counted over all MoE layers (an item is one (MoE layer, slot) of the rank). Walking the layers
of every step in order, the experts a layer needs (slots with at least one token) are looked
up: a hit costs nothing, a miss is copied from host memory on demand; then the prefetcher names
the experts to copy now for the next layer. When the cache is full, the eviction policy picks a
victim among the items the current layer and the prefetch do not need:

- ``lru``: least recently used;
- ``lfu``: least frequently used (ties: least recently used);
- ``belady``: the item used farthest in the future (Belady's optimal offline policy; it sees the
  whole run's accesses, so its hit rate bounds every online policy's from above).

Prefetchers: ``none``; ``oracle`` (the next layer's actual needs, from the routing itself: a
bound); ``affinity`` (the next layer's expected tokens per expert from this layer's loads and
the source's cross-layer affinity ``P(j at l+1 | i at l)``; every expert of the rank whose
chance of getting a token, ``1 - exp(-expected tokens)``, is at least one half).

Decisions depend only on the order of accesses, not on time, so the cache runs ahead of the
timing engine (:func:`simulate_cache`); the engine then times the copies on the PCIe link.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moesim.errors import CapacityError
from moesim.registry import Registry


@dataclass
class CacheState:
    """What eviction policies may look at.

    Attributes:
        last_use: item -> time of its last access or insertion.
        count: item -> accesses so far.
        uses: item -> sorted times of all its accesses in the run (Belady's future).
        now: Current time (one tick per MoE layer visit).
    """

    last_use: dict[int, int]
    count: dict[int, int]
    uses: dict[int, list[int]]
    now: int

    def next_use(self, item: int) -> float:
        """Time of ``item``'s next access after now (inf if none)."""
        times = self.uses.get(item, [])
        i = bisect.bisect_right(times, self.now)
        return float(times[i]) if i < len(times) else float("inf")


VictimFn = Callable[[list[int], CacheState], int]
CACHE_POLICIES: Registry[VictimFn] = Registry("cache policy")


@CACHE_POLICIES.register("lru")
def lru(candidates: list[int], st: CacheState) -> int:
    """Least recently used."""
    return min(candidates, key=lambda i: (st.last_use[i], i))


@CACHE_POLICIES.register("lfu")
def lfu(candidates: list[int], st: CacheState) -> int:
    """Least frequently used; ties to the least recently used."""
    return min(candidates, key=lambda i: (st.count.get(i, 0), st.last_use[i], i))


@CACHE_POLICIES.register("belady")
def belady(candidates: list[int], st: CacheState) -> int:
    """The item needed farthest in the future (optimal; needs the whole access sequence)."""
    return max(candidates, key=lambda i: (st.next_use(i), -i))


@dataclass(frozen=True)
class PrefetchInput:
    """What a prefetcher sees of one cache (one EP rank of one replica).

    Attributes:
        needed: ``needed[t]``: items (``moe_layer * num_experts + expert``) needed at access
            ``t``; accesses walk the MoE layers of every step in order.
        loads: ``loads[t]``: ``[E]`` tokens per expert at ``t``'s layer.
        maps: ``maps[t]``: ``[moe_layers, slots]`` the rank's expert in each slot at ``t``.
        moe_layers / num_experts: The model's.
        transition: On demand, ``[moe_layers, E, E]`` P(expert j at the next layer | expert i
            at this one), rows summing to top-k (from the co-activation sample).
    """

    needed: list[list[int]]
    loads: list[np.ndarray]
    maps: list[np.ndarray]
    moe_layers: int
    num_experts: int
    transition: Callable[[], np.ndarray]


Prefetcher = Callable[[PrefetchInput], list[list[int]]]
"""``PrefetchInput -> prefetch[t]``: items to copy at ``t`` for ``t + 1``, in order."""
PREFETCHERS: Registry[Prefetcher] = Registry("prefetch")


@PREFETCHERS.register("none")
def no_prefetch(inp: PrefetchInput) -> list[list[int]]:
    """Nothing is copied ahead."""
    return [[] for _ in inp.needed]


@PREFETCHERS.register("oracle")
def oracle_prefetch(inp: PrefetchInput) -> list[list[int]]:
    """Exactly what the next access needs (a bound: it reads the future)."""
    return [
        list(inp.needed[t + 1]) if t + 1 < len(inp.needed) else [] for t in range(len(inp.needed))
    ]


@PREFETCHERS.register("affinity")
def affinity(inp: PrefetchInput) -> list[list[int]]:
    """The next layer's experts likely to get a token, from cross-layer affinity
    (:func:`affinity_prefetch`); nothing after the last MoE layer."""
    out: list[list[int]] = [[] for _ in inp.needed]
    for t in range(len(inp.needed)):
        m = t % inp.moe_layers
        if m + 1 >= inp.moe_layers:
            continue
        nxt = inp.maps[t][m + 1]
        picks = affinity_prefetch(
            np.asarray(inp.loads[t], dtype=np.float64), inp.transition()[m], nxt
        )
        out[t] = list(dict.fromkeys((m + 1) * inp.num_experts + int(nxt[s]) for s in picks))
    return out


def affinity_transition(nxt: np.ndarray, top_k: int) -> np.ndarray:
    """``[L-1, E, E]`` rows of next-layer co-activation counts scaled to sum to ``top_k``
    (uniform where a row has no counts)."""
    rows = nxt.sum(axis=2, keepdims=True)
    uniform = np.full_like(nxt, top_k / nxt.shape[2], dtype=np.float64)
    return np.where(rows > 0, nxt * top_k / np.maximum(rows, 1e-300), uniform)


@dataclass(frozen=True)
class CacheRun:
    """Per access time ``t`` (one per MoE layer visit) of one cache.

    Attributes:
        hits / accesses: ``[T]`` int, needed experts found in HBM / needed in all.
        demand: ``[T]`` int, experts copied on demand at ``t`` (0 without admission).
        missed: ``missed[t]``: items needed at ``t`` and not in HBM, in access order.
        prefetch_used: ``[T]`` list of bool per prefetch copy issued at ``t`` for ``t + 1``,
            in issue order: whether ``t + 1`` used it.
    """

    hits: np.ndarray
    accesses: np.ndarray
    demand: np.ndarray
    prefetch_used: list[list[bool]]
    missed: list[list[int]]


def simulate_cache(
    needed: list[list[int]],
    prefetch: list[list[int]],
    capacity: int,
    policy: str,
    admit: bool = True,
) -> CacheRun:
    """Run one cache over the access sequence.

    Args:
        needed: ``needed[t]``: items accessed at time ``t``.
        prefetch: ``prefetch[t]``: items to copy at ``t`` for ``t + 1``, best first.
        capacity: Items the cache holds.
        policy: Eviction-policy registry name.
        admit: Copy a missed item into the cache. False: misses run elsewhere (on the host
            CPUs); the cache starts with the run's most used items, as Fiddler places the most
            popular experts on the GPU from a profile of their use, and changes only by
            prefetch.

    Raises:
        ValueError: one time needs more items than the cache holds.
    """
    victim = CACHE_POLICIES.get(policy)
    uses: dict[int, list[int]] = {}
    for t, items in enumerate(needed):
        for i in items:
            uses.setdefault(i, []).append(t)
    st = CacheState(last_use={}, count={}, uses=uses, now=0)
    cache: set[int] = set()
    n = len(needed)
    hits, accesses, demand = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    issued: list[list[int]] = [[] for _ in range(n)]
    missed: list[list[int]] = [[] for _ in range(n)]

    if not admit:
        for i in sorted(uses, key=lambda i: (-len(uses[i]), i))[:capacity]:
            cache.add(i)
            st.last_use[i] = -1

    def insert(item: int, protected: set[int]) -> bool:
        if len(cache) >= capacity:
            candidates = [i for i in cache if i not in protected]
            if not candidates:
                return False
            cache.discard(victim(candidates, st))
        cache.add(item)
        st.last_use[item] = st.now
        return True

    for t in range(n):
        st.now = t
        need = set(needed[t])
        if admit and len(need) > capacity:
            raise CapacityError(
                f"one MoE layer needs {len(need)} experts on a GPU but the offload cache holds "
                f"{capacity}; raise policies.offload.cache_experts (or cache_gib)"
            )
        accesses[t] = len(need)
        for i in needed[t]:
            if i in cache:
                hits[t] += 1
            else:
                missed[t].append(i)
                if admit:
                    insert(i, need)
                    demand[t] += 1
            st.last_use[i] = t
            st.count[i] = st.count.get(i, 0) + 1
        protected = need | set(prefetch[t])
        for i in prefetch[t]:
            if i not in cache and insert(i, protected):
                issued[t].append(i)
    used = [[i in set(needed[t + 1]) if t + 1 < n else False for i in issued[t]] for t in range(n)]
    return CacheRun(hits=hits, accesses=accesses, demand=demand, prefetch_used=used, missed=missed)


def affinity_prefetch(loads: np.ndarray, transition: np.ndarray, slots: np.ndarray) -> list[int]:
    """Slots of the next layer worth prefetching, most likely first.

    Args:
        loads: ``[E]`` tokens per expert at this layer.
        transition: ``[E, E]`` P(expert j at the next layer | expert i at this one), rows sum
            to top-k (a token picks k experts).
        slots: ``[S]`` the rank's experts at the next layer (index = slot).

    Returns:
        Slot indices with P(at least one token) = 1 - exp(-expected tokens) >= 1/2, by
        decreasing expected tokens.
    """
    k = max(float(transition.sum(axis=1).max()), 1e-12)
    # a token's next experts: the average of its k experts' rows (each row sums to k)
    lam = (loads @ transition / k)[slots]
    order = np.argsort(-lam, kind="stable")
    return [int(s) for s in order if 1 - np.exp(-lam[s]) >= 0.5]
