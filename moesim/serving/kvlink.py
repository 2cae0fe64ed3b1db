"""How a prefilled KV cache reaches its decode instance: the sending NICs of a prefill
instance's DP-attention ranks, shared by the transfers leaving them (a fluid model: each
transfer's rate is what is left of the NIC over the transfers in flight, recomputed as they
start and end, and as the instance's own steps, whose all-to-alls take their share of every
NIC, start and end), then the network's latency. See :mod:`moesim.serving.scheduler`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

R = TypeVar("R", bound=Hashable)
"""A request (the scheduler's own type)."""


@dataclass(frozen=True)
class KVLink:
    """How prefilled KV caches reach the decode instances.

    Attributes:
        bytes_per_token: KV-cache bytes of one token (all layers).
        nic_bytes_per_s: What one GPU's NIC sends per second.
        latency_s: Network latency of a transfer.
        ranks: DP-attention ranks (NICs) of a prefill instance.
    """

    bytes_per_token: float
    nic_bytes_per_s: float
    latency_s: float
    ranks: int


class NICs(Generic[R]):
    """The sending NICs of the prefill instances' ranks, each shared equally by the KV
    transfers leaving it, less what the instance's own step takes (see the module
    docstring). ``push(time, "nic", payload)`` queues the event at which a transfer may be
    through; the caller hands the payload back to :meth:`arrived` then."""

    def __init__(self, link: KVLink, push: Callable[[float, str, object], None]) -> None:
        self.link, self.push = link, push
        self.flows: dict[tuple[int, int], dict[R, float]] = {}  # bytes left per transfer
        self.since: dict[tuple[int, int], float] = {}
        self.version: dict[tuple[int, int], int] = {}
        self.busy: dict[int, float] = {}  # share of its NICs an instance's step takes
        self.sent = 0  # requests handed to NICs, for the rank each leaves from

    def capacity(self, key: tuple[int, int]) -> float:
        """Bytes per second the transfers leaving ``key``'s NIC share now."""
        return self.link.nic_bytes_per_s * (1.0 - self.busy.get(key[0], 0.0))

    def set_busy(self, instance: int, share: float, now: float) -> None:
        """The instance's step starts (``share`` of each NIC) or ends (0)."""
        if self.busy.get(instance, 0.0) == share:
            return
        keys = [k for k in self.flows if k[0] == instance]
        for k in keys:
            self._advance(k, now)
        self.busy[instance] = share
        for k in keys:
            self._schedule(k, now)

    def send(self, instance: int, r: R, tokens: int, now: float) -> None:
        """Start moving the KV cache of ``r``'s ``tokens`` from a rank of ``instance`` (the
        ranks in turn)."""
        key = (instance, self.sent % self.link.ranks)
        self.sent += 1
        self._advance(key, now)
        self.flows.setdefault(key, {})[r] = tokens * self.link.bytes_per_token
        self._schedule(key, now)

    def arrived(self, payload: tuple[object, ...], now: float) -> list[tuple[R, float]]:
        """The transfers through at ``now`` (a ``push``-ed payload), with the time each
        reaches its decode instance."""
        key, version = payload
        assert isinstance(key, tuple)
        if self.version.get(key) != version:  # the NIC's transfers changed since
            return []
        self._advance(key, now)
        flows = self.flows[key]
        done = [r for r, left in flows.items() if left <= 1e-6 * self.link.bytes_per_token]
        for r in done:
            del flows[r]
        self._schedule(key, now)
        return [(r, now + self.link.latency_s) for r in done]

    def _advance(self, key: tuple[int, int], now: float) -> None:
        flows = self.flows.get(key)
        if flows:
            sent = self.capacity(key) / len(flows) * (now - self.since[key])
            for r in flows:
                flows[r] -= sent
        self.since[key] = now

    def _schedule(self, key: tuple[int, int], now: float) -> None:
        self.version[key] = self.version.get(key, 0) + 1
        flows, cap = self.flows.get(key), self.capacity(key)
        if flows and cap > 0:  # (a NIC its step takes whole waits for the step's end)
            first = min(flows.values())
            at = now + max(first, 0.0) * len(flows) / cap
            self.push(at, "nic", (key, self.version[key]))
