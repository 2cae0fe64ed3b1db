"""The run folder, written once and atomically.

Layout of ``results/<scenario>/<run-id>/``:

- ``scenario.yaml``: the resolved scenario (after ``--set`` overrides), plus model and hardware;
- ``summary.json``: see :mod:`moesim.metrics.summary`;
- ``layers.parquet``: one row per (step, layer, gpu);
- ``links.parquet``: one row per (collective phase, link with traffic): bytes and utilisation
  (:mod:`moesim.metrics.links`);
- ``timeline.json``: Chrome trace events (open in https://ui.perfetto.dev or chrome://tracing);
- ``report.html``: plotly report (timeline, per-layer breakdown, tokens per GPU).

Everything is written to a hidden temporary folder beside the target and renamed into place,
so a failed run leaves nothing half-written; an existing run folder is never overwritten
(``run-id`` is the UTC time plus the seed, with a counter when two runs share a second).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from moesim import jsonout
from moesim.errors import ConfigError
from moesim.registry import shorten

if TYPE_CHECKING:
    from moesim.config.resolved import ResolvedScenario
    from moesim.results.result import RunResult


def summary_json(summary: dict[str, Any]) -> str:
    """The exact text of ``summary.json`` (sorted keys, so equal runs give equal bytes)."""
    return jsonout.dumps(summary, indent=2, sort_keys=True) + "\n"


def run_stamp() -> str:
    """The UTC time that starts every results folder's name (``20261202T223655Z``)."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _run_dir(base: Path, tag: str) -> Path:
    name = f"{run_stamp()}-{tag}"
    candidate, n = base / name, 1
    while candidate.exists():
        n += 1
        candidate = base / f"{name}-{n}"
    return candidate


def output_root(root: str | Path, field: str = "output.dir") -> Path:
    """The results root ``root`` (``~`` expanded), created if missing and checked writable.

    Called before a run simulates, so that a bad folder is an error at once, not after the
    run. ``field`` names the setting it came from in the message (``output.dir``, ``--out``).

    Raises:
        ConfigError: the folder cannot be created, is a file, or is not writable.
    """
    path = Path(root).expanduser()
    shown = shorten(str(path))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(None, field, f"'{shown}' exists and is not a folder") from None
    except OSError as exc:
        raise ConfigError(None, field, f"cannot create '{shown}': {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(None, field, f"folder '{shown}' is not writable")
    return path


def _remove_abandoned(base: Path) -> None:
    """Remove hidden temporary folders of writers that died (SIGKILL) before renaming them."""
    for tmp in base.glob(".*.pid*.*"):
        match = re.search(r"\.pid(\d+)\.", tmp.name)
        if match and tmp.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_folder(base: str | Path, tag: str, fill: Callable[[Path], None]) -> Path:
    """Create ``<base>/<UTC time>-<tag>/`` atomically: ``fill`` writes into a hidden
    temporary folder (named with the writer's process id) that is renamed into place only
    when it returns; an existing folder is never overwritten (a counter is appended), a
    failure leaves nothing behind, and folders left by killed writers are removed.
    """
    base = Path(base).expanduser()
    final = _run_dir(base, tag)
    base.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(base)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.pid{os.getpid()}.", dir=base))
    try:
        fill(tmp)
        while True:
            try:
                os.rename(tmp, final)
                return final
            except OSError:
                if not final.exists():
                    raise
                final = _run_dir(base, tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolved_yaml(r: ResolvedScenario) -> str:
    """The resolved scenario as YAML, with model and hardware descriptions appended."""
    doc = {
        "scenario": r.scenario.model_dump(mode="json"),
        "model": r.model.model_dump(mode="json"),
        "hardware": r.hardware.model_dump(mode="json"),
    }
    return yaml.safe_dump(doc, sort_keys=False)


def write_run_dir(result: RunResult, out_root: str | Path | None = None) -> Path:
    """Write every file of the run folder; returns the final folder."""

    def fill(tmp: Path) -> None:
        result.layers.to_parquet(tmp / "layers.parquet", index=False)
        if result.links is not None:
            result.links.to_parquet(tmp / "links.parquet", index=False)
        trace = {"traceEvents": _trace_metadata(result) + result.timeline, "displayTimeUnit": "ms"}
        (tmp / "timeline.json").write_text(jsonout.dumps(trace), encoding="utf-8")
        if result.resolved.scenario.output.report:
            from moesim.results.report import write_report

            write_report(result, tmp / "report.html")

    return write_scenario_run(result.resolved, result.summary, fill, out_root)


def write_scenario_run(
    r: ResolvedScenario,
    summary: dict[str, Any],
    fill: Callable[[Path], None],
    out_root: str | Path | None = None,
) -> Path:
    """Write a run folder ``<out_root>/<scenario>/<run-id>/`` (``out_root`` defaults to the
    scenario's ``output.dir``) atomically: ``scenario.yaml`` and ``summary.json``, then what
    ``fill`` writes into the folder for its kind of run; returns the final folder."""
    root = Path(out_root if out_root is not None else r.scenario.output.dir).expanduser()

    def write(tmp: Path) -> None:
        (tmp / "scenario.yaml").write_text(resolved_yaml(r), encoding="utf-8")
        (tmp / "summary.json").write_text(summary_json(summary), encoding="utf-8")
        fill(tmp)

    return write_folder(root / r.scenario.name, f"seed{r.scenario.seed}", write)


def _trace_metadata(result: RunResult) -> list[dict[str, Any]]:
    """Process/thread names so Perfetto shows 'node N' / 'gpu G'."""
    gpn = result.resolved.gpus_per_node
    meta: list[dict[str, Any]] = []
    for g in range(result.resolved.world):
        if g % gpn == 0:
            meta.append(
                {
                    "name": "process_name",
                    "ph": "M",
                    "pid": g // gpn,
                    "args": {"name": f"node {g // gpn}"},
                }
            )
        meta.append(
            {
                "name": "thread_name",
                "ph": "M",
                "pid": g // gpn,
                "tid": g,
                "args": {"name": f"gpu {g}"},
            }
        )
    return meta
