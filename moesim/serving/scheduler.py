"""Serving instances stepping through requests: continuous batching, chunked prefill, a paged
KV cache with admission and preemption, and prefill/decode disaggregation.

An *instance* is one engine (one EP group with DP attention, SGLang's layout). It runs one
step at a time. With ``mixed=False`` (SGLang's default) a step is a prefill step or a decode
step: prefill first when requests wait and memory allows, then decode. With ``mixed=True``
(vLLM's default, Sarathi-Serve's stall-free batching) every step decodes all running requests
and fills what is left of the token budget (``max_prefill_tokens``, decode tokens counted one
each) with prompt chunks, those in progress first:

- **Prefill step**: waiting requests in arrival order, their prompt tokens (and, after a
  preemption, the tokens they had generated) up to ``max_prefill_tokens`` per step; a prompt
  longer than what is left of the budget is cut, the rest goes in the next step (chunked
  prefill). A request is admitted only when the KV cache can hold its whole prompt
  (``kv_block_tokens`` pages). The step that completes a prompt produces the request's first
  token.
- **Decode step**: every running request (at most ``max_running``) gets ``tokens_per_step``
  more tokens on average (speculative decoding / MTP: each request keeps a running credit, so
  a mean of 1.7 gives 1, 2, 2, 1, 2, ... tokens). A request whose next tokens need a page the
  cache does not have preempts the latest-admitted running request (its pages freed, it goes
  back to the head of the queue to prefill prompt and output so far again: recompute).
- **Disaggregation**: a prefill instance hands each request whose prompt is done to a decode
  instance (round-robin); its KV cache crosses the network first (:mod:`moesim.serving.kvlink`):
  it lives on one DP-attention rank of the prefill instance (requests go to ranks in turn), and
  the transfers leaving one rank share its NIC equally (a fluid model: each transfer's rate is
  the NIC's over the transfers in flight, recomputed as they start and end), then pay the
  network's latency. While the prefill instance runs a step, its own all-to-alls take their
  share of every rank's NIC (the step's inter-node bytes per GPU over the NIC's rate and the
  step's seconds, from the layer model: ``StepCosts.prefill_nic_share``) and the transfers share
  what is left: they fill the gaps between the step's dispatch and combine bursts, on average,
  and do not slow the step itself. The decode instance admits the request when its cache has
  room for it (its own NICs' receiving side is not modelled).

Step durations come from a ``StepCosts`` (:mod:`moesim.serving.costs` prices them with the
layer model). Everything is deterministic: ties in time are broken by event order.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from moesim.serving.kvlink import KVLink, NICs


class StepCosts(Protocol):
    """Seconds of one engine step."""

    def prefill(self, tokens: int, sequences: int) -> float:
        """A prefill step of ``tokens`` prompt tokens from ``sequences`` requests."""
        ...

    def decode(self, batch: int, context: float) -> float:
        """A decode step of ``batch`` requests at mean context ``context`` tokens."""
        ...

    def mixed(self, tokens: int, sequences: int, batch: int, context: float) -> float:
        """A step of ``tokens`` prompt tokens from ``sequences`` requests and ``batch``
        decoding requests at mean context ``context``."""
        ...

    def prefill_nic_share(self, tokens: int, sequences: int) -> float:
        """Share of each GPU's NIC a prefill step's own all-to-alls take (0 to 1)."""
        ...


@dataclass(frozen=True)
class InstanceSpec:
    """What an instance may hold and run.

    Attributes:
        max_running: Requests decoding at once.
        max_prefill_tokens: Prompt tokens per prefill step.
        kv_tokens: Tokens the KV cache holds (per instance).
        kv_block_tokens: Tokens per KV page.

    Whether an instance prefills, decodes or both follows from the pool it is given to
    :func:`serve` in.
    """

    max_running: int
    max_prefill_tokens: int
    kv_tokens: int
    kv_block_tokens: int

    @property
    def kv_blocks(self) -> int:
        """Pages of the KV cache."""
        return self.kv_tokens // self.kv_block_tokens


@dataclass(eq=False)  # requests compare by identity
class _Req:
    rid: int
    arrival: float
    prompt: int
    output: int
    done_prompt: int = 0  # tokens whose KV cache is built (by prefill or decode)
    generated: int = 0
    credit: float = 0.0
    blocks: int = 0
    first_token: float = float("nan")
    finish: float = float("nan")
    preempted: int = 0
    admitted: int = -1  # admission order (preemption picks the latest)
    running: bool = False  # holds pages on its instance

    @property
    def context(self) -> int:
        return self.prompt + self.generated

    @property
    def to_prefill(self) -> int:
        """Tokens whose KV cache must be built by prefill before the next decode step: the
        prompt and every output token but the newest (the next step's input)."""
        return self.prompt + max(self.generated - 1, 0) - self.done_prompt


@dataclass
class Trace:
    """What a serving run produced.

    Attributes:
        arrival, scheduled, first_token, finish: Seconds per request (NaN: did not get
            there); scheduled: the start of the first step that worked on its prompt.
        prompt, output, preemptions: Per request.
        steps: ``(instance, kind, start, end, tokens, batch, decoding, kv_used_tokens)`` per
            step (kind prefill, decode or mixed; tokens: prompt tokens plus one per decoding
            request; decoding: requests decoding in it).
    """

    arrival: np.ndarray
    scheduled: np.ndarray
    first_token: np.ndarray
    finish: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    preemptions: np.ndarray
    steps: list[tuple[int, str, float, float, int, int, int, int]] = field(default_factory=list)


class _Instance:
    def __init__(self, index: int, spec: InstanceSpec, costs: StepCosts) -> None:
        self.index, self.spec, self.costs = index, spec, costs
        self.waiting: deque[_Req] = deque()
        self.running: list[_Req] = []
        self.free_blocks = spec.kv_blocks
        self.busy = False
        self.admissions = 0

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.spec.kv_block_tokens)

    def kv_used(self) -> int:
        return (self.spec.kv_blocks - self.free_blocks) * self.spec.kv_block_tokens


def serve(
    arrival: np.ndarray,
    prompt: np.ndarray,
    output: np.ndarray,
    prefill: list[InstanceSpec],
    decode: list[InstanceSpec],
    prefill_costs: StepCosts,
    decode_costs: StepCosts,
    tokens_per_step: float = 1.0,
    link: KVLink | None = None,
    closed_loop: int | None = None,
    mixed: bool = False,
) -> Trace:
    """Serve requests (arrival seconds, prompt and output tokens) on the instances.

    Args:
        prefill: Prefill instances; empty when the decode instances also prefill
            (co-located serving).
        decode: Decode instances.
        tokens_per_step: Mean tokens a request gains per decode step (MTP / speculative).
        link: How a request's KV cache moves from its prefill instance to its decode
            instance (disaggregated serving; None: instantly).
        closed_loop: ``clients`` each sending its next request when the last one finishes
            (benchmark clients at a fixed concurrency); ``arrival`` is ignored but for order.
        mixed: Instances that decode batch prompt chunks with their decode steps (see the
            module docstring); prefill instances of a disaggregated deployment never decode.

    Raises:
        ValueError: a request could never fit in an instance's KV cache.
    """
    n = arrival.size
    reqs = [_Req(i, float(arrival[i]), int(prompt[i]), int(output[i])) for i in range(n)]
    pre = [_Instance(i, s, prefill_costs) for i, s in enumerate(prefill)]
    dec = [_Instance(len(pre) + i, s, decode_costs) for i, s in enumerate(decode)]
    colocated = not pre
    entry = dec if colocated else pre
    for inst in entry + dec:
        need = max(inst.blocks_for(r.prompt + r.output) for r in reqs) if reqs else 0
        if need > inst.spec.kv_blocks:
            raise ValueError(
                f"a request of {max(r.prompt + r.output for r in reqs)} tokens needs {need} KV "
                f"pages but an instance holds {inst.spec.kv_blocks}"
            )
    trace = Trace(
        arrival=np.full(n, np.nan),
        scheduled=np.full(n, np.nan),
        first_token=np.full(n, np.nan),
        finish=np.full(n, np.nan),
        prompt=prompt.astype(np.int64),
        output=output.astype(np.int64),
        preemptions=np.zeros(n, dtype=np.int64),
    )
    events: list[tuple[float, int, str, object]] = []
    seq = [0]

    def push(t: float, kind: str, payload: object) -> None:
        heapq.heappush(events, (t, seq[0], kind, payload))
        seq[0] += 1

    if closed_loop:
        for r in reqs[:closed_loop]:
            push(0.0, "arrive", r)
        pending = deque(reqs[closed_loop:])
    else:
        for r in reqs:
            push(r.arrival, "arrive", r)
        pending = deque()
    rr = [0, 0]  # round-robin pointers: entry instances, decode instances

    def start(inst: _Instance, now: float) -> None:
        if inst.busy:
            return
        decodes = colocated or inst in dec
        step = _plan_step(inst, decodes, mixed and decodes)
        if step is None:
            return
        inst.busy = True
        for r in step.chunks:
            if np.isnan(trace.scheduled[r.rid]):
                trace.scheduled[r.rid] = now
        trace.steps.append(
            (
                inst.index,
                step.kind,
                now,
                now + step.cost,
                sum(step.takes) + len(step.decoding),
                len(step.chunks) + len(step.decoding),
                len(step.decoding),
                inst.kv_used(),
            )
        )
        push(now + step.cost, "done", (inst, step))
        if nics is not None and not decodes:  # the step's all-to-alls share its NICs
            nics.set_busy(
                inst.index, inst.costs.prefill_nic_share(sum(step.takes), len(step.chunks)), now
            )

    ready: dict[int, _Instance] = {}  # instances to (re)start once this instant is done
    nics: NICs[_Req] | None = NICs(link, push) if link is not None else None

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            assert isinstance(payload, _Req)
            r = payload
            r.arrival = now
            trace.arrival[r.rid] = now
            inst = entry[rr[0] % len(entry)]
            rr[0] += 1
            inst.waiting.append(r)
            ready[inst.index] = inst
        elif kind == "nic":
            assert isinstance(payload, tuple) and nics is not None
            for r, at in nics.arrived(payload, now):
                push(at, "handoff", r)
        elif kind == "handoff":
            assert isinstance(payload, _Req)
            r = payload
            inst = dec[rr[1] % len(dec)]
            rr[1] += 1
            r.done_prompt = r.prompt + max(r.generated - 1, 0)  # its KV cache arrived whole
            inst.waiting.append(r)
            ready[inst.index] = inst
        else:
            assert isinstance(payload, tuple)
            inst, step = payload
            assert isinstance(inst, _Instance) and isinstance(step, _Step)
            inst.busy = False
            if nics is not None:
                nics.set_busy(inst.index, 0.0, now)
            finished = _finish_step(inst, step, now, tokens_per_step, trace)
            for _ in finished:  # closed loop: each finished request's client sends the next
                if closed_loop and pending:
                    push(now, "arrive", pending.popleft())
            if not colocated and inst not in dec:
                for r in step.chunks:
                    if r.to_prefill == 0 and r.running:  # (a one-token request is done)
                        inst.running.remove(r)
                        r.running = False
                        inst.free_blocks += r.blocks
                        r.blocks = 0
                        if link is None:
                            push(now, "handoff", r)
                        else:
                            assert nics is not None
                            nics.send(inst.index, r, r.prompt, now)
            ready[inst.index] = inst
            if not colocated:
                for other in dec:
                    ready[other.index] = other
        # a scheduler sees everything that happened at this instant before it picks a batch
        if not events or events[0][0] > now:
            for inst in sorted(ready.values(), key=lambda i: i.index):
                start(inst, now)
            ready.clear()
    return trace


@dataclass
class _Step:
    """A planned step: prompt chunks (``takes[i]`` tokens of ``chunks[i]``) and requests
    decoding one step each."""

    kind: str
    chunks: list[_Req]
    takes: list[int]
    decoding: list[_Req]
    cost: float = 0.0


def _plan_step(inst: _Instance, decodes: bool, mixed: bool) -> _Step | None:
    """The instance's next step (None: nothing to do): a prefill step when requests wait and
    fit, else a decode step of the running requests; ``mixed``: the running requests decode
    and prompt chunks fill the rest of the token budget."""
    spec = inst.spec
    step = _Step("prefill", [], [], [])
    budget = spec.max_prefill_tokens
    if mixed:
        step.decoding = _decoding(inst)[:budget]
        budget -= len(step.decoding)

    def chunk(r: _Req) -> None:
        nonlocal budget
        take = min(r.to_prefill, budget)
        step.chunks.append(r)
        step.takes.append(take)
        budget -= take

    # the chunk of a request already admitted comes first
    for r in [x for x in inst.running if x.to_prefill > 0]:
        if budget <= 0:
            break
        chunk(r)
    while inst.waiting and budget > 0 and len(inst.running) < spec.max_running:
        r = inst.waiting[0]
        need = inst.blocks_for(r.context + (1 if decodes else 0))
        if need > inst.free_blocks:
            break
        inst.waiting.popleft()
        inst.free_blocks -= need
        r.blocks = need
        r.admitted = inst.admissions
        inst.admissions += 1
        inst.running.append(r)
        r.running = True
        if r.to_prefill == 0:  # a handed-off request: its cache is here already
            continue
        chunk(r)
    tokens, seqs = sum(step.takes), len(step.chunks)
    if step.decoding:
        context = float(np.mean([r.context for r in step.decoding]))
        if seqs:
            step.kind = "mixed"
            step.cost = inst.costs.mixed(tokens, seqs, len(step.decoding), context)
        else:
            step.kind = "decode"
            step.cost = inst.costs.decode(len(step.decoding), context)
        return step
    if seqs:
        step.cost = inst.costs.prefill(tokens, seqs)
        return step
    if not decodes:
        return None
    ready = _decoding(inst)
    if not ready:
        return None
    context = float(np.mean([r.context for r in ready]))
    return _Step("decode", [], [], ready, inst.costs.decode(len(ready), context))


def _decoding(inst: _Instance) -> list[_Req]:
    """Running requests whose next step is a decode step."""
    return [r for r in inst.running if r.to_prefill == 0 and r.generated < r.output]


def _finish_step(
    inst: _Instance, step: _Step, now: float, tokens_per_step: float, trace: Trace
) -> list[_Req]:
    """Apply a finished step (its prompt chunks, then its decodes); the requests that
    completed."""
    done: list[_Req] = []
    for r, take in zip(step.chunks, step.takes, strict=True):
        if not r.running:  # preempted by a decode of the same step (see below)
            continue
        r.done_prompt += take
        if r.to_prefill == 0 and r.generated == 0:
            r.generated = 1  # the step that completes a prompt samples its first token
            r.first_token = now
            trace.first_token[r.rid] = now
            if r.generated >= r.output:
                done.append(_complete(inst, r, now, trace))
    for r in step.decoding:
        if not r.running:  # preempted earlier in this loop
            continue
        r.credit += tokens_per_step
        gain = min(int(r.credit), r.output - r.generated)
        r.credit -= int(r.credit)
        need = inst.blocks_for(r.context + gain) - r.blocks
        while need > inst.free_blocks:
            victim = max(inst.running, key=lambda x: x.admitted)
            _preempt(inst, victim, trace)
            if victim is r:
                break
        if not r.running:
            continue
        inst.free_blocks -= max(need, 0)
        r.blocks += max(need, 0)
        r.generated += gain
        r.done_prompt += gain  # the step wrote the KV of its input and the accepted drafts
        if r.generated >= r.output:
            done.append(_complete(inst, r, now, trace))
    return done


def _complete(inst: _Instance, r: _Req, now: float, trace: Trace) -> _Req:
    inst.running.remove(r)
    r.running = False
    inst.free_blocks += r.blocks
    r.blocks = 0
    r.finish = now
    trace.finish[r.rid] = now
    return r


def _preempt(inst: _Instance, r: _Req, trace: Trace) -> None:
    """Free ``r``'s pages and queue it first, to prefill its prompt and output again."""
    inst.running.remove(r)
    r.running = False
    inst.free_blocks += r.blocks
    r.blocks = 0
    r.done_prompt = 0
    r.preempted += 1
    trace.preemptions[r.rid] += 1
    inst.waiting.appendleft(r)
