"""What a run will cost before it starts: simulated work, memory and a rough wall time.

``moesim run`` and ``moesim check`` print a warning when a run would take more than a few
minutes, and refuse one whose arrays would not fit this machine's memory, naming the setting
that shrinks it.

The wall time is a rough model, not a promise. Steps the lockstep walk runs
(:mod:`moesim.timing.lockstep`: inference without overlap, TP, PP, offload or migration)
cost ``PER_LOCKSTEP_WALK_S`` per GPU, layer and step, and per all-to-all phase of ``f``
flows ``PHASE_S + PER_PHASE_FLOW_S * f`` (one compiled call: a phase's Python work, then its
flows); other steps, on SimPy, ``PER_GPU_LAYER_S`` per GPU, layer, step and micro-batch,
plus per phase the smaller of ``PER_FLOW_S * f**1.25`` (small phases: the max-min rate rounds
grow a little faster than the flows) and ``PER_LARGE_PHASE_S * f**0.5`` (large ones). Every
routed token-expert assignment costs ``PER_ASSIGNMENT_S`` (drawn and counted). The constants
come from the benchmarks in ``benchmarks/results.json`` on a 2-core machine (2026-12-03,
after issue 17's work: B1, Mixtral decode on 8 GPUs, 200 steps, 2.4 s, estimated 1.7 s; B2,
DeepSeek-V3 prefill on 64 GPUs, 2.3 s, estimated 1.3 s; B3, DeepSeek-V3 decode on 256 GPUs,
20 steps, 8-11 s, estimated 10.0 s; B5, the same on 1,024 GPUs, 5 steps, 23 s, estimated
9.8 s: past 512 GPUs paths are routed per phase); they are good to a factor of about 2.5
(numba's loading, half a second, is not counted).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moesim.errors import CapacityError
from moesim.timing import pipeline

if TYPE_CHECKING:
    from moesim.config.loading import ResolvedScenario

PER_GPU_LAYER_S = 80e-6
PER_FLOW_S = 1.4e-6
PER_LARGE_PHASE_S = 1e-4
PER_LOCKSTEP_WALK_S = 6e-6
PHASE_S = 1e-4
PER_PHASE_FLOW_S = 3.2e-8
PER_ASSIGNMENT_S = 1e-8
WARN_S = 180.0
"""Runs estimated to take longer than this get a warning first (seconds)."""
PHASES = 11
"""Timed phases per (step, layer, GPU) held by the collector."""


@dataclass(frozen=True)
class WorkEstimate:
    """The simulated work of a run.

    Attributes:
        gpu_layer_steps: (GPU, layer, step, micro-batch) walks the engine simulates.
        flows_per_phase: Point-to-point flows of one all-to-all phase (GPU pairs).
        collective_phases: All-to-all phases over the run (dispatch and combine per MoE layer
            and micro-batch, twice in training).
        memory_bytes: Peak memory of the arrays kept for the results, bytes.
        seconds: Rough wall time on a 2-core machine (see the module docstring).
    """

    gpu_layer_steps: int
    flows_per_phase: int
    collective_phases: int
    memory_bytes: float
    seconds: float

    def describe(self) -> str:
        """One line for a warning."""
        return (
            f"{self.gpu_layer_steps:,} GPU-layer steps, {self.collective_phases:,} all-to-all "
            f"phases of about {self.flows_per_phase:,} flows, "
            f"{self.memory_bytes / 2**30:.1f} GiB of result arrays, "
            f"roughly {duration(self.seconds)} on 2 cores"
        )


def duration(seconds: float) -> str:
    """``seconds`` as a person reads a wait: seconds, minutes or hours."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


SERVING_GRID_POINTS = 14
"""Steps a serving run typically simulates (its cost grid, moesim.serving.costs: 14 on the
shipped DeepSeek-V3 PD scenario)."""


def estimate(r: ResolvedScenario) -> WorkEstimate:
    """The work of running ``r`` (nothing is simulated).

    A pipelined training step walks one stage's GPUs through each memoised op (forward and
    backward of every chunk, DualPipe's pairs too) for each sampled micro-batch; a serving run
    simulates one step of an instance per grid point it reaches.
    """
    s, m = r.scenario, r.model
    w, par = s.workload, s.parallelism
    micro = s.policies.overlap.micro_batches
    passes = 2 if w.mode == "train" else 1
    sim_world, steps = r.world, w.steps
    if pipeline.pipelined(r):
        sim_world = par.stage_world
        dual = 2 if s.policies.pipeline.schedule == "dualpipe" and par.pp > 1 else 1
        micro = min(s.engine.micro_batch_samples, w.micro_batches) * dual
    elif w.mode == "serve":
        sim_world, steps, passes = par.ep * par.tp, SERVING_GRID_POINTS, 1
    walks = steps * m.num_layers * sim_world * micro * passes
    flows = sim_world * min(par.ep, sim_world)
    phases = steps * len(m.moe_layers) * 2 * micro * passes
    tokens = w.batch_size * (1 if w.mode == "decode" else w.seq_len)
    assignments = (
        steps * len(m.moe_layers) * tokens * m.moe.top_k * (par.dp if w.mode != "serve" else 1)
    )
    seq_bins = 32 if w.mode != "decode" else 1
    cells = w.steps * m.num_layers * r.world
    memory = 8.0 * (cells * (PHASES + 1) + 4 * w.steps * len(m.moe_layers) * (r.world + seq_bins))
    memory += 8.0 * 6 * m.num_layers * sim_world * max(m.moe.num_experts, sim_world)  # a step
    if lockstep_like(r):
        seconds = PER_LOCKSTEP_WALK_S * walks + phases * (PHASE_S + PER_PHASE_FLOW_S * flows)
    else:
        per_phase = min(PER_FLOW_S * flows**1.25, PER_LARGE_PHASE_S * flows**0.5)
        seconds = PER_GPU_LAYER_S * walks + phases * per_phase
    seconds += PER_ASSIGNMENT_S * assignments
    return WorkEstimate(walks, flows, phases, memory, seconds)


def lockstep_like(r: ResolvedScenario) -> bool:
    """Whether the scenario's steps look like the lockstep walk's (its settings; the engine
    also checks the network: :meth:`moesim.timing.lockstep.LockstepSteps.lockstep_applies`)."""
    s = r.scenario
    par = s.parallelism
    return (
        s.engine.lockstep
        and s.workload.mode in ("decode", "prefill")
        and s.policies.overlap.micro_batches == 1
        and par.tp == 1
        and par.pp == 1
        and not s.policies.offload.enabled
        and not s.policies.placement.rebalance_every_steps
    )


def machine_memory() -> float:
    """Physical memory of this machine in bytes (inf where the OS does not say)."""
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def available_memory() -> float:
    """Memory free for a new allocation on this machine, bytes (MemAvailable where Linux says,
    else the physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return machine_memory()


def check_machine(r: ResolvedScenario, work: WorkEstimate) -> None:
    """Refuse a run whose result arrays would not fit in this machine's memory.

    Raises:
        CapacityError: with the numbers and the settings that shrink the run.
    """
    have = machine_memory()
    if work.memory_bytes > 0.8 * have:
        raise CapacityError(
            f"{r.scenario.name}: the run would hold {work.memory_bytes / 2**30:.1f} GiB of "
            f"result arrays but this machine has {have / 2**30:.1f} GiB; lower "
            "workload.steps (or the GPU count)"
        )
