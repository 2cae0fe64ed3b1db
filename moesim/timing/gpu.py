"""A GPU as the engine sees it: in-order streams for compute, communication and copies."""

from __future__ import annotations

import simpy


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


class GPU:
    """One GPU: a compute stream, a communication engine and a copy engine.

    Args:
        env: The SimPy environment.
        index: Global GPU index.
        node: Node index.
    """

    def __init__(self, env: simpy.Environment, index: int, node: int) -> None:
        self.index, self.node = index, node
        self.compute = Stream(env)
        self.comm = Stream(env)
        self.copy = Stream(env)
