"""A GPU as the engine sees it: in-order streams for compute, communication and copies."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from typing import Any

import simpy

SpanFn = Callable[[str, float, float], None]
"""Called with (phase, start, end) once a piece's span is known."""


class Stream:
    """An in-order work queue (like a CUDA stream): work starts when the previous work ends.

    Args:
        env: The SimPy environment.
    """

    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self.free_at = 0.0
        self.busy_s = 0.0

    def submit(self, duration: float) -> tuple[float, simpy.Event]:
        """Queue ``duration`` seconds of work; returns (start time, event at its end)."""
        if duration < 0:
            raise ValueError(f"negative duration {duration}")
        start = max(self.env.now, self.free_at)
        self.free_at = start + duration
        self.busy_s += duration
        return start, self.env.timeout(self.free_at - self.env.now)

    def run(self, pieces: list[tuple[str, float]], span: SpanFn) -> simpy.Event:
        """Queue ``pieces`` (phase, seconds) as one submission; ``span`` gets each piece's
        (phase, start, end); returns the event at their end."""
        start, done = self.submit(sum(d for _, d in pieces))
        t = start
        for phase, d in pieces:
            span(phase, t, t + d)
            t += d
        return done


class SharedSMStream(Stream):
    """A compute stream that slows down while communication kernels occupy some of its SMs.

    Work is queued in full-GPU seconds; while ``comm_started`` calls outnumber
    ``comm_ended`` calls, it progresses at ``rate`` (the share of SMs left to compute, e.g.
    (132 - 20) / 132 on an H100 next to DeepEP's 20-SM kernels) and at full speed otherwise. A
    piece's span is known when it ends, so ``span`` is called then.

    Args:
        env: The SimPy environment.
        rate: Compute speed while communication holds SMs, in (0, 1].
    """

    def __init__(self, env: simpy.Environment, rate: float) -> None:
        super().__init__(env)
        if not 0 < rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {rate}")
        self.slow_rate = rate
        self.active = 0
        self.slowed_s = 0.0  # extra seconds compute took because of communication kernels
        self._queue: deque[tuple[list[tuple[str, float]], SpanFn, simpy.Event]] = deque()
        self._wake: simpy.Event | None = None
        self._changed: simpy.Event | None = None
        env.process(self._serve())

    @property
    def rate(self) -> float:
        """Current compute speed (1 = all SMs)."""
        return self.slow_rate if self.active else 1.0

    def comm_started(self) -> None:
        """A communication kernel took its SMs."""
        self.active += 1
        if self.active == 1:
            self._rate_changed()

    def comm_ended(self) -> None:
        """A communication kernel gave its SMs back."""
        self.active -= 1
        if self.active == 0:
            self._rate_changed()

    def _rate_changed(self) -> None:
        if self._changed is not None and not self._changed.triggered:
            self._changed.succeed()

    def submit(self, duration: float) -> tuple[float, simpy.Event]:
        """Not available: the start of queued work is only known when it starts."""
        raise NotImplementedError("SharedSMStream takes work through run()")

    def run(self, pieces: list[tuple[str, float]], span: SpanFn) -> simpy.Event:
        if any(d < 0 for _, d in pieces):
            raise ValueError(f"negative duration in {pieces}")
        done = self.env.event()
        self._queue.append((pieces, span, done))
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()
        return done

    def _serve(self) -> Generator[simpy.Event, Any, None]:
        env = self.env
        while True:
            if not self._queue:
                self._wake = env.event()
                yield self._wake
                continue
            pieces, span, done = self._queue.popleft()
            for phase, work in pieces:
                start = env.now
                while True:
                    rate, t0 = self.rate, env.now
                    self._changed = env.event()
                    timer = env.timeout(work / rate)
                    fired = yield env.any_of([timer, self._changed])
                    self.slowed_s += (env.now - t0) * (1 - rate)
                    if timer in fired:
                        break
                    work -= (env.now - t0) * rate  # the rate changed: go on at the new one
                span(phase, start, env.now)
                self.busy_s += env.now - start
            self.free_at = env.now
            done.succeed()


class GPU:
    """One GPU: a compute stream, a communication engine and a copy engine.

    Args:
        env: The SimPy environment.
        index: Global GPU index.
        node: Node index.
        comm_rate: Compute speed while communication kernels hold SMs; below 1 the compute
            stream is a :class:`SharedSMStream`.
    """

    def __init__(
        self, env: simpy.Environment, index: int, node: int, comm_rate: float = 1.0
    ) -> None:
        self.index, self.node = index, node
        self.compute: Stream = SharedSMStream(env, comm_rate) if comm_rate < 1 else Stream(env)
        self.comm = Stream(env)
        self.copy = Stream(env)
