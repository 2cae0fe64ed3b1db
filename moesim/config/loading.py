"""Loading a scenario file: YAML, overrides, validation, and resolving model and hardware.

Loading writes nothing. Every error names the file, the field path and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesim.config.overrides import apply_overrides
from moesim.config.scenario import Scenario
from moesim.config.validation import is_file, read_yaml, validate
from moesim.errors import ConfigError, ConfigErrors
from moesim.hardware.catalog import load_profile
from moesim.hardware.profile import HardwareProfile
from moesim.models.presets import resolve_model
from moesim.models.spec import ModelSpec, slots_per_rank
from moesim.registry import closest, shorten


@dataclass(frozen=True)
class ResolvedScenario:
    """A validated scenario with its model and hardware resolved.

    Attributes:
        scenario: The validated scenario.
        model: The model description.
        hardware: The hardware profile.
        path: The scenario file (None when built in code).
    """

    scenario: Scenario
    model: ModelSpec
    hardware: HardwareProfile
    path: Path | None = None

    @property
    def world(self) -> int:
        """GPUs in the scenario."""
        return self.scenario.parallelism.world

    @property
    def slots_per_rank(self) -> int:
        """Physical expert slots on each EP rank: (experts + redundant) / ep."""
        return slots_per_rank(
            self.model.moe.num_experts,
            self.scenario.policies.placement.redundant_experts,
            self.scenario.parallelism.ep,
        )

    @property
    def gpus_per_node(self) -> int:
        """GPUs per node, from the hardware profile."""
        return self.hardware.node.gpus_per_node


def name_errors(data: dict[str, Any], file: Path | None) -> list[ConfigError]:
    """Policy names of a scenario (as a dict) that no registry holds, each with the field and
    the valid names; the one place names are checked (:data:`moesim.policies.FAMILIES`)."""
    from moesim.policies import FAMILIES, registry_for

    errors = []
    for family, (field, _, _) in FAMILIES.items():
        node: Any = data
        for part in field.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, str):  # absent (the default) or of a wrong type (pydantic's)
            continue
        registry = registry_for(family)
        if node not in registry:
            valid = registry.names()
            errors.append(
                ConfigError(
                    file,
                    field,
                    f"unknown {family} '{shorten(node)}'{closest(node, valid)}; "
                    f"valid: {', '.join(valid)}",
                )
            )
    return errors


def _with_file(exc: ConfigError | ConfigErrors, path: Path | None) -> ConfigError | ConfigErrors:
    """Attach ``path`` to errors that were raised without a file."""
    if isinstance(exc, ConfigErrors):
        return ConfigErrors([_with_file(e, path) for e in exc.errors])  # type: ignore[misc]
    if exc.file is None and path is not None:
        return ConfigError(path, exc.field, exc.message)
    return exc


def check_consistency(r: ResolvedScenario) -> list[ConfigError]:
    """Cross-field checks that no single field can make; returns the problems found."""
    s, m, hw, f = r.scenario, r.model, r.hardware, r.path
    par, w = s.parallelism, s.workload
    problems = []
    gpus = s.cluster.nodes * hw.node.gpus_per_node
    if par.world != gpus:
        problems.append(
            ConfigError(
                f,
                "parallelism",
                (
                    f"dp*ep*tp = {par.dp}*{par.ep}*{par.tp} = {par.world} GPUs, but the cluster "
                    f"has {s.cluster.nodes} node(s) x {hw.node.gpus_per_node} GPUs ({hw.name}) "
                    f"= {gpus}"
                ),
            )
        )
    if m.moe.num_experts % par.ep:
        problems.append(
            ConfigError(
                f,
                "parallelism.ep",
                (f"ep = {par.ep} must divide the {m.moe.num_experts} experts of {m.name}"),
            )
        )
    if w.batch_size % par.ep:
        problems.append(
            ConfigError(
                f,
                "workload.batch_size",
                (
                    f"batch_size = {w.batch_size} must be a multiple of ep = {par.ep} "
                    "(each EP rank runs attention for batch_size/ep sequences)"
                ),
            )
        )
    if par.tp > 1 and hw.node.gpus_per_node % par.tp:
        problems.append(
            ConfigError(
                f,
                "parallelism.tp",
                (f"tp = {par.tp} must divide the {hw.node.gpus_per_node} GPUs of a node"),
            )
        )
    if s.policies.offload.type != "none" and w.mode == "train":
        problems.append(
            ConfigError(
                f,
                "policies.offload.type",
                "expert offload is simulated for inference (decode, prefill), not training",
            )
        )
    if s.policies.overlap.micro_batches > 1:
        seqs = w.batch_size // par.ep if w.batch_size % par.ep == 0 else 0
        tokens = seqs * (1 if w.mode == "decode" else w.seq_len)
        if tokens < 2:
            problems.append(
                ConfigError(
                    f,
                    "policies.overlap.micro_batches",
                    f"two micro-batches need at least 2 tokens per EP rank; {w.mode} with "
                    f"batch_size {w.batch_size} over ep {par.ep} gives {tokens}",
                )
            )
        if s.policies.offload.type != "none":
            problems.append(
                ConfigError(
                    f,
                    "policies.overlap.micro_batches",
                    "two-batch overlap is not simulated together with expert offload",
                )
            )
    if s.policies.offload.type != "none" and s.policies.offload.miss == "cpu":
        absent = [k for k in ("host_memory_gb_per_s", "host_tflops") if getattr(hw.node, k) is None]
        if absent:
            problems.append(
                ConfigError(
                    f,
                    "policies.offload.miss",
                    f"miss cpu runs experts on the host, but hardware profile {hw.name} has no "
                    f"node.{' or node.'.join(absent)}",
                )
            )
    if s.cluster.nodes > 1 and hw.node.nic_gb_per_s <= 0:
        problems.append(
            ConfigError(
                f,
                "cluster.nodes",
                f"{s.cluster.nodes} nodes need a network, but hardware profile {hw.name} has no "
                "node.nic_gb_per_s",
            )
        )
    off = s.policies.offload
    if off.type == "cache" and off.cache_gib is not None:
        one = m.expert_bytes(w.dtype, par.tp)
        if off.cache_gib * 2**30 < one:
            problems.append(
                ConfigError(
                    f,
                    "policies.offload.cache_gib",
                    f"{off.cache_gib:g} GiB holds no expert: one expert slice of {m.name} in "
                    f"{w.dtype} is {one / 2**30:.3f} GiB",
                )
            )
    redundant = s.policies.placement.redundant_experts
    if redundant and (m.moe.num_experts + redundant) % par.ep:
        problems.append(
            ConfigError(
                f,
                "policies.placement.redundant_experts",
                f"experts ({m.moe.num_experts}) + redundant ({redundant}) must split evenly "
                f"over ep = {par.ep}",
            )
        )
    for name in ("dtype", "dispatch_dtype"):
        dtype = getattr(w, name)
        if dtype == "fp8" and "fp8" not in hw.gpu.peak_dense_tflops and name == "dtype":
            problems.append(
                ConfigError(
                    f,
                    f"workload.{name}",
                    (
                        f"{hw.gpu.model} has no fp8 matrix units (profile lists "
                        f"{', '.join(hw.gpu.peak_dense_tflops)})"
                    ),
                )
            )
    return problems


def resolve(scenario: Scenario, path: Path | None = None) -> ResolvedScenario:
    """Resolve model and hardware of a validated scenario and run the cross-field checks."""
    base = path.parent if path is not None else None
    errors = name_errors(scenario.model_dump(), path)
    model = hardware = None
    try:
        model = resolve_model(scenario.model, base)
    except (ConfigError, ConfigErrors) as exc:
        errors += _flatten(_with_file(exc, path))
    try:
        hardware = load_profile(scenario.hardware, base)
    except (ConfigError, ConfigErrors) as exc:
        errors += _flatten(_with_file(exc, path))
    if model is None or hardware is None:
        raise ConfigErrors(errors)
    scenario, routing_errors = _resolve_routing_files(scenario, model, base, path)
    errors += routing_errors
    resolved = ResolvedScenario(scenario, model, hardware, path)
    errors += check_consistency(resolved)
    if errors:
        raise ConfigErrors(errors)
    return resolved


def _resolve_routing_files(
    scenario: Scenario, model: ModelSpec, base: Path | None, path: Path | None
) -> tuple[Scenario, list[ConfigError]]:
    """Make ``routing.path`` / ``routing.fit`` absolute and check they fit the model."""
    from moesim.routing.replay import trace_mismatch
    from moesim.traces.format import TraceError, read_meta

    routing, update, errors = scenario.routing, {}, []
    wanted = {"path": routing.source == "trace", "fit": routing.generator == "fitted"}
    for name, needed in wanted.items():
        ref = getattr(routing, name)
        if ref is None or not needed:
            continue
        file = Path(ref)
        if not file.is_absolute() and base is not None:
            file = base / file
        if not is_file(file):
            errors.append(
                ConfigError(
                    path,
                    f"routing.{name}",
                    f"'{shorten(ref)}' not found (relative to the scenario)",
                )
            )
            continue
        update[name] = str(file.resolve())
        if file.suffix != ".parquet":
            continue
        try:
            why = trace_mismatch(read_meta(file), model, routing.layer_map)
        except TraceError as e:
            why = str(e)
        if why:
            errors.append(ConfigError(path, f"routing.{name}", why))
    if update:
        scenario = scenario.model_copy(update={"routing": routing.model_copy(update=update)})
    return scenario, errors


def _flatten(exc: ConfigError | ConfigErrors) -> list[ConfigError]:
    return exc.errors if isinstance(exc, ConfigErrors) else [exc]


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> ResolvedScenario:
    """Load, override, validate and resolve a scenario file.

    Args:
        path: The scenario YAML.
        overrides: ``key.path=value`` strings applied before validation.

    Raises:
        ConfigError / ConfigErrors: with the file, field path and what was expected.
    """
    p = Path(path)
    data = read_yaml(p)
    try:
        data = apply_overrides(data, overrides or [])
    except ConfigError as exc:
        raise _with_file(exc, p) from None
    try:
        scenario = validate(Scenario, data, p)
    except ConfigErrors as exc:  # report bad names with the other field errors, at once
        raise ConfigErrors(exc.errors + name_errors(data, p)) from None
    return resolve(scenario, p)
