"""Cross-field checks of a resolved scenario: what no single field can say.

Each check is a small function of the resolved scenario that yields ``(field, message)`` for
every problem it finds; :data:`CHECKS` lists them in the order they are reported. Adding a rule
is one function here and one entry in the tuple.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moesim.config.resolved import ResolvedScenario

Problems = Iterator[tuple[str, str]]


def world_size(r: ResolvedScenario) -> Problems:
    """pp * dp * ep * tp GPUs must be the cluster's."""
    s, hw, par = r.scenario, r.hardware, r.scenario.parallelism
    gpus = s.cluster.nodes * hw.node.gpus_per_node
    if par.world != gpus:
        yield (
            "parallelism",
            (
                f"pp*dp*ep*tp = {par.pp}*{par.dp}*{par.ep}*{par.tp} = {par.world} GPUs, but the "
                f"cluster has {s.cluster.nodes} node(s) x {hw.node.gpus_per_node} GPUs "
                f"({hw.name}) = {gpus}"
            ),
        )


def pipeline_layout(r: ResolvedScenario) -> Problems:
    """Pipeline stages: training only, a schedule that fits pp, vpp and the micro-batches,
    chunks the layers can fill, stages that fill whole nodes or share one."""
    from moesim.timing.pipeline import chunk_count

    s = r.scenario
    par, w, sched = s.parallelism, s.workload, s.policies.pipeline.schedule
    m = w.micro_batches
    if par.pp > 1 and w.mode != "train":
        yield ("parallelism.pp", f"pipeline stages are simulated in training only, not {w.mode}")
        return
    if (sched == "interleaved") != (par.vpp > 1) and par.pp > 1:
        yield (
            "policies.pipeline.schedule",
            f"schedule {sched} with vpp = {par.vpp}: interleaved 1F1B needs vpp > 1, and "
            "vpp > 1 needs the interleaved schedule",
        )
    if sched == "interleaved" and par.pp > 1 and m % par.pp:
        yield (
            "workload.micro_batches",
            f"interleaved 1F1B needs micro_batches ({m}) to be a multiple of pp ({par.pp})",
        )
    if sched == "dualpipe" and (par.pp % 2 or m % 2 or m < 2 * par.pp or par.vpp > 1):
        yield (
            "policies.pipeline.schedule",
            f"DualPipe needs an even pp (got {par.pp}), vpp 1 (got {par.vpp}) and an even "
            f"micro_batches of at least 2 * pp = {2 * par.pp} (got {m})",
        )
    chunks = chunk_count(par.pp, par.vpp, sched)
    layers = r.model.num_layers
    if par.pp_layout is not None:
        if len(par.pp_layout) != chunks or sum(par.pp_layout) != layers:
            yield (
                "parallelism.pp_layout",
                f"{len(par.pp_layout)} entries summing to {sum(par.pp_layout)}, but "
                f"{chunks} chunks of the {layers} layers of {r.model.name} are needed",
            )
    elif chunks > layers:
        yield (
            "parallelism.pp",
            f"{chunks} pipeline chunks but {r.model.name} has only {layers} layers",
        )
    gpn = r.gpus_per_node
    if par.pp > 1 and par.stage_world % gpn and gpn % par.stage_world:
        yield (
            "parallelism",
            f"a stage of dp*ep*tp = {par.stage_world} GPUs must fill whole nodes of {gpn} "
            "or share one evenly",
        )
    pipelined = par.pp > 1 or m > 1
    if pipelined and s.policies.overlap.micro_batches > 1:
        yield (
            "policies.overlap.micro_batches",
            "two-batch overlap is not simulated with pipelined micro-batches (DualPipe "
            "overlaps a forward chunk with a backward chunk instead)",
        )


def ep_divides_experts(r: ResolvedScenario) -> Problems:
    """Every EP rank holds as many expert slots: ep divides the experts, or the experts plus
    redundant replicas (checked by :func:`redundant_slots_split`) of a placement that makes
    replicas (60 experts + 4 redundant over EP8, say)."""
    from moesim.policies.placement import PLACEMENTS, with_replicas

    ep, m = r.scenario.parallelism.ep, r.model
    placement = r.scenario.policies.placement
    if not m.moe.num_experts % ep:
        return
    if not placement.redundant_experts:
        yield (
            "parallelism.ep",
            (
                f"ep = {ep} must divide the {m.moe.num_experts} experts of {m.name}, or "
                "policies.placement.redundant_experts fill the slots up to a multiple of ep "
                f"(placement {' or '.join(with_replicas())})"
            ),
        )
    elif placement.type in PLACEMENTS and not PLACEMENTS.get(placement.type).replicas:
        yield (
            "policies.placement.type",
            (
                f"placement {placement.type} keeps one copy per expert, so ep = {ep} must "
                f"divide the {m.moe.num_experts} experts; redundant experts need "
                f"{' or '.join(with_replicas())}"
            ),
        )


def batch_splits_over_ep(r: ResolvedScenario) -> Problems:
    """Each EP rank runs attention for batch_size / ep sequences."""
    w, ep = r.scenario.workload, r.scenario.parallelism.ep
    if w.batch_size % ep:
        yield (
            "workload.batch_size",
            (
                f"batch_size = {w.batch_size} must be a multiple of ep = {ep} "
                "(each EP rank runs attention for batch_size/ep sequences)"
            ),
        )


def tp_inside_a_node(r: ResolvedScenario) -> Problems:
    """A tensor-parallel group stays inside one node."""
    tp, gpn = r.scenario.parallelism.tp, r.hardware.node.gpus_per_node
    if tp > 1 and gpn % tp:
        yield "parallelism.tp", f"tp = {tp} must divide the {gpn} GPUs of a node"


def offload_for_inference(r: ResolvedScenario) -> Problems:
    """Expert offload is simulated for inference."""
    if r.scenario.policies.offload.enabled and r.scenario.workload.mode == "train":
        yield (
            "policies.offload.type",
            ("expert offload is simulated for inference (decode, prefill), not training"),
        )


def two_batch_overlap(r: ResolvedScenario) -> Problems:
    """Two micro-batches need two tokens per rank, and no offload."""
    s = r.scenario
    w, par = s.workload, s.parallelism
    if s.policies.overlap.micro_batches <= 1:
        return
    seqs = w.batch_size // par.ep if w.batch_size % par.ep == 0 else 0
    tokens = seqs * (1 if w.mode in ("decode", "serve") else w.seq_len)
    if tokens < 2:
        yield (
            "policies.overlap.micro_batches",
            (
                f"two micro-batches need at least 2 tokens per EP rank; {w.mode} with "
                f"batch_size {w.batch_size} over ep {par.ep} gives {tokens}"
            ),
        )
    if s.policies.offload.enabled:
        yield (
            "policies.overlap.micro_batches",
            ("two-batch overlap is not simulated together with expert offload"),
        )


def host_experts_need_host_figures(r: ResolvedScenario) -> Problems:
    """Running missed experts on the CPU needs the host's bandwidth and FLOP/s."""
    off, hw = r.scenario.policies.offload, r.hardware
    if not off.enabled or off.miss != "cpu":
        return
    absent = [k for k in ("host_memory_gb_per_s", "host_tflops") if getattr(hw.node, k) is None]
    if absent:
        yield (
            "policies.offload.miss",
            (
                f"miss cpu runs experts on the host, but hardware profile {hw.name} has no "
                f"node.{' or node.'.join(absent)}"
            ),
        )


def nodes_need_a_network(r: ResolvedScenario) -> Problems:
    """Several nodes need NIC bandwidth."""
    nodes, hw = r.scenario.cluster.nodes, r.hardware
    if nodes > 1 and hw.node.nic_gb_per_s <= 0:
        yield (
            "cluster.nodes",
            (
                f"{nodes} nodes need a network, but hardware profile {hw.name} has no "
                "node.nic_gb_per_s"
            ),
        )


def cache_holds_an_expert(r: ResolvedScenario) -> Problems:
    """An offload cache given in GiB must hold at least one expert."""
    off, w, m = r.scenario.policies.offload, r.scenario.workload, r.model
    if off.type != "cache" or off.cache_gib is None:
        return
    one = m.expert_bytes(w.dtype, r.scenario.parallelism.tp)
    if off.cache_gib * 2**30 < one:
        yield (
            "policies.offload.cache_gib",
            (
                f"{off.cache_gib:g} GiB holds no expert: one expert slice of {m.name} in "
                f"{w.dtype} is {one / 2**30:.3f} GiB"
            ),
        )


def redundant_slots_split(r: ResolvedScenario) -> Problems:
    """Experts plus redundant replicas split evenly over the ranks."""
    redundant = r.scenario.policies.placement.redundant_experts
    experts, ep = r.model.moe.num_experts, r.scenario.parallelism.ep
    if redundant and (experts + redundant) % ep:
        yield (
            "policies.placement.redundant_experts",
            (f"experts ({experts}) + redundant ({redundant}) must split evenly over ep = {ep}"),
        )


def fp8_needs_fp8_units(r: ResolvedScenario) -> Problems:
    """FP8 compute needs FP8 matrix units."""
    gpu = r.hardware.gpu
    if r.scenario.workload.dtype == "fp8" and "fp8" not in gpu.peak_dense_tflops:
        yield (
            "workload.dtype",
            (
                f"{gpu.model} has no fp8 matrix units (profile lists "
                f"{', '.join(gpu.peak_dense_tflops)})"
            ),
        )


CHECKS: tuple[Callable[[ResolvedScenario], Problems], ...] = (
    world_size,
    pipeline_layout,
    ep_divides_experts,
    batch_splits_over_ep,
    tp_inside_a_node,
    offload_for_inference,
    two_batch_overlap,
    host_experts_need_host_figures,
    nodes_need_a_network,
    cache_holds_an_expert,
    redundant_slots_split,
    fp8_needs_fp8_units,
)
