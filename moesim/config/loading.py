"""Loading a scenario file: YAML, overrides, validation, and resolving model and hardware.

Loading writes nothing. Every error names the file, the field path and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moesim.config.overrides import apply_overrides
from moesim.config.resolved import ResolvedScenario
from moesim.config.scenario import Scenario
from moesim.config.validation import is_file, read_yaml, validate
from moesim.errors import ConfigError, ConfigErrors
from moesim.hardware.catalog import load_profile
from moesim.models.presets import resolve_model
from moesim.models.spec import ModelSpec
from moesim.registry import closest, shorten


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
    """Cross-field checks that no single field can make (:data:`moesim.config.checks.CHECKS`);
    returns the problems found."""
    from moesim.config.checks import CHECKS

    return [ConfigError(r.path, field, msg) for check in CHECKS for field, msg in check(r)]


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
    errors += _prefill_pool_errors(resolved)
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


def _prefill_pool_errors(r: ResolvedScenario) -> list[ConfigError]:
    """The cross-field checks of a disaggregated scenario's prefill pool (its own nodes,
    hardware and parallelism), reported at its fields."""
    from moesim.config.pools import prefill_pool

    field = "serving.prefill.hardware"
    try:
        pool = prefill_pool(r)
    except (ConfigError, ConfigErrors) as exc:
        return [ConfigError(r.path, field, e.message or str(e)) for e in _flatten(exc)]
    if pool is None:
        return []
    out = []
    for e in check_consistency(pool):
        if e.field.startswith("parallelism"):
            where = f"serving.prefill.{e.field}"
        elif e.field in ("cluster.nodes", "hardware"):
            where = f"serving.prefill.{e.field.removeprefix('cluster.')}"
        else:
            where = f"serving.prefill (as {e.field})"
        out.append(ConfigError(r.path, where, e.message))
    return out


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
