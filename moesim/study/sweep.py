"""Sweeps: a scenario run over a grid of overrides, into one table.

    moesim sweep scenarios/x.yaml --grid policies.placement.type=contiguous,eplb \
        --grid parallelism.ep=8,16

Each grid point is the scenario with one ``key=value`` per ``--grid`` (the Cartesian product,
in the order given); the rows come back in grid order. Points run in a pool of local processes,
or on a Dask cluster (``--scheduler tcp://host:8786``, or ``--scheduler local`` for a local Dask
cluster; ``pip install 'moesim[distributed]'``). With Dask every point's scenario is validated
and resolved here and shipped whole, so workers need moesim but not the scenario file; files the
scenario names (a routing trace) must be readable at the same path on the workers.
A point that fails (bad combination, does not fit in HBM, or a bug) gets its error in the
``error`` column and the others still run. Values are split on commas, so one value cannot hold
one.

Interruptions: each finished point is saved at once as one small file in a points folder
(:class:`PointStore`, ``<results>/<scenario>/<time>-sweep.points/``), so a sweep that is
interrupted (Ctrl-C, SIGTERM, SIGKILL, a crash) keeps what it finished, and
``moesim sweep ... --resume FOLDER`` runs only the missing points, giving the same table as an
uninterrupted sweep. The points folder is removed once the sweep folder is written. Local worker
processes exit by themselves when the sweep's process dies, however it dies.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from moesim import jsonout
from moesim.errors import ConfigError

if TYPE_CHECKING:
    from moesim.config.loading import ResolvedScenario

CONNECT_TIMEOUT_S = 20  # how long to wait for a Dask scheduler


def expand_grid(grid: list[str]) -> list[list[str]]:
    """``["a=1,2", "b=x,y"]`` -> ``[["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ...]``."""
    axes = []
    for text in grid:
        if "=" not in text:
            raise ConfigError(None, "--grid", f"expected key.path=v1,v2,..., got '{text}'")
        key, raw = text.split("=", 1)
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not key.strip() or not values:
            raise ConfigError(None, "--grid", f"expected key.path=v1,v2,..., got '{text}'")
        axes.append([f"{key.strip()}={v}" for v in values])
    return [list(p) for p in itertools.product(*axes)]


class PointStore:
    """Finished grid points of one sweep on disk: ``plan.json`` (what the sweep is) and one
    ``point-NNNNN.json`` per finished point (its summary or error), each written atomically.

    Args:
        folder: The points folder.
        plan: The sweep: scenario path, a hash of its text, and every point's overrides.
    """

    def __init__(self, folder: Path, plan: dict[str, Any]) -> None:
        self.folder, self.plan = folder, plan

    @staticmethod
    def plan_of(scenario: str | Path, full: list[list[str]]) -> dict[str, Any]:
        """The plan of a sweep of ``scenario`` over the points ``full``."""
        text = Path(scenario).read_bytes()
        return {
            "scenario": str(Path(scenario).resolve()),
            "scenario_sha256": hashlib.sha256(text).hexdigest(),
            "points": full,
        }

    @classmethod
    def create(cls, parent: Path, plan: dict[str, Any]) -> PointStore:
        """A new points folder under ``parent`` (``<UTC time>-sweep.points``)."""
        from moesim.results.writer import run_stamp

        stamp = run_stamp()
        parent.mkdir(parents=True, exist_ok=True)
        folder, n = parent / f"{stamp}-sweep.points", 1
        while True:
            try:
                folder.mkdir()
                break
            except FileExistsError:
                n += 1
                folder = parent / f"{stamp}-sweep-{n}.points"
        store = cls(folder, plan)
        store._write("plan.json", plan)
        return store

    @classmethod
    def resume(cls, folder: Path, plan: dict[str, Any]) -> PointStore:
        """Reopen ``folder``; its plan must be this sweep's (same scenario text and points)."""
        try:
            saved = json.loads((folder / "plan.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(
                None, "--resume", f"'{folder}' is not a sweep's points folder: {exc}"
            ) from None
        for key, what in (
            ("scenario_sha256", "the scenario file changed since"),
            ("points", "the grid or --set overrides differ"),
        ):
            if saved.get(key) != plan[key]:
                raise ConfigError(None, "--resume", f"'{folder}' is another sweep: {what}")
        return cls(folder, plan)

    def done(self) -> dict[int, dict[str, Any]]:
        """Summaries (or errors) of the points finished so far, by point index."""
        out = {}
        for path in self.folder.glob("point-*.json"):
            out[int(path.stem.split("-")[1])] = json.loads(path.read_text(encoding="utf-8"))
        return out

    def save(self, index: int, summary: dict[str, Any]) -> None:
        """Record point ``index`` as finished."""
        self._write(f"point-{index:05d}.json", summary)

    def _write(self, name: str, doc: Any) -> None:
        tmp = self.folder / f".{name}.{os.getpid()}"
        tmp.write_text(jsonout.dumps(doc, sort_keys=True), encoding="utf-8")
        tmp.replace(self.folder / name)

    def remove(self) -> None:
        """Delete the points folder (the sweep folder holds everything now)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _watch_parent() -> None:
    """Worker initializer: exit when the sweep's process is gone (even SIGKILLed)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def run_point(scenario: str, overrides: list[str]) -> dict[str, Any]:
    """Simulate one grid point; its summary, or ``{"error": message}``."""
    try:
        resolved = _resolve_point(scenario, overrides)
    except Exception as exc:  # a bug must not abort the other points
        return {"error": _bug(exc)}
    return resolved if isinstance(resolved, dict) else simulate_point(resolved)


def _resolve_point(scenario: str, overrides: list[str]) -> ResolvedScenario | dict[str, Any]:
    from moesim.config.loading import load_scenario
    from moesim.errors import MoesimError

    try:
        return load_scenario(scenario, overrides)
    except (MoesimError, ValueError) as exc:
        return {"error": str(exc)}


def _bug(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc} (a moesim bug; please report it with this scenario)"


def simulate_point(resolved: ResolvedScenario) -> dict[str, Any]:
    """Simulate a resolved grid point (what a Dask worker runs); its summary or its error."""
    from moesim.errors import MoesimError
    from moesim.runner import simulate

    try:
        if resolved.scenario.workload.mode == "serve":
            from moesim.serving.run import simulate_serving

            return simulate_serving(resolved).summary
        return simulate(resolved).summary
    except (MoesimError, ValueError) as exc:
        return {"error": str(exc)}
    except Exception as exc:  # a bug must not abort the other points
        return {"error": _bug(exc)}


def sweep_table(points: list[list[str]], summaries: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per grid point: the grid values (numbers or booleans where every value of an
    axis parses as one, as the scenario reads it; else text), then the comparison columns (or
    the error)."""
    from moesim.config.overrides import parse_override
    from moesim.study.compare import columns_for

    columns = columns_for(summaries)
    rows = []
    for overrides, s in zip(points, summaries, strict=True):
        row: dict[str, Any] = {}
        for o in overrides:
            key, value = o.split("=", 1)
            row[key] = value
        if "error" in s:
            row.update({c: float("nan") for c in columns})
            row["error"] = s["error"]
        else:
            row.update({c: float(get(s)) for c, (_, get) in columns.items()})
            row["error"] = ""
        rows.append(row)
    table = pd.DataFrame(rows)
    for key in {o.split("=", 1)[0] for p in points for o in p}:
        typed = [parse_override(f"{key}={v}")[1] for v in table[key]]
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in typed)
        if numbers or all(isinstance(v, bool) for v in typed):
            table[key] = typed
    return table


def run_sweep(
    scenario: str | Path,
    grid: list[str],
    base_overrides: list[str] | None = None,
    jobs: int = 1,
    progress: Callable[[int, int], None] | None = None,
    scheduler: str | None = None,
    store: PointStore | None = None,
) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Run every grid point and return the table: in ``jobs`` local processes (1 runs here),
    or on the Dask cluster at ``scheduler`` (``"local"`` starts one of ``jobs`` workers).
    With a ``store``, points it holds are not run again and each finished one is saved.

    Returns:
        ``(table, summaries)`` in grid order.
    """
    points = expand_grid(grid)
    full = [(base_overrides or []) + p for p in points]
    summaries: list[dict[str, Any]] = [{} for _ in points]
    finished = store.done() if store is not None else {}
    for i, s in finished.items():
        summaries[i] = s
    todo = {i: o for i, o in enumerate(full) if i not in finished}
    count = [len(finished)]

    def record(i: int, summary: dict[str, Any]) -> None:
        summaries[i] = summary
        if store is not None:
            store.save(i, summary)
        count[0] += 1
        if progress:
            progress(count[0], len(points))

    if progress and finished:
        progress(count[0], len(points))
    if scheduler:
        _run_on_dask(str(scenario), todo, record, scheduler, jobs)
    elif jobs <= 1:
        for i, o in todo.items():
            record(i, run_point(str(scenario), o))
    elif todo:
        with ProcessPoolExecutor(max_workers=jobs, initializer=_watch_parent) as pool:
            futures = {pool.submit(run_point, str(scenario), o): i for i, o in todo.items()}
            for fut in as_completed(futures):
                record(futures[fut], fut.result())
    return sweep_table(points, summaries), summaries


def _run_on_dask(
    scenario: str,
    points: dict[int, list[str]],
    record: Callable[[int, dict[str, Any]], None],
    scheduler: str,
    jobs: int,
) -> None:
    """Run ``points`` (index -> overrides) on a Dask cluster, handing each result to
    ``record``; points whose scenario is invalid are recorded here, not sent."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ConfigError(
            None,
            "--scheduler",
            "sweeping on Dask needs dask.distributed: pip install 'moesim[distributed]'",
        ) from None
    todo: dict[int, ResolvedScenario] = {}
    for i, o in points.items():
        resolved = _resolve_point(scenario, o)
        if isinstance(resolved, dict):
            record(i, resolved)
        else:
            todo[i] = resolved
    if not todo:
        return
    if scheduler == "local":
        cluster = LocalCluster(
            n_workers=max(1, jobs), threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    else:
        cluster = None
        try:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(
                None, "--scheduler", f"cannot reach the Dask scheduler at '{scheduler}': {exc}"
            ) from None
    try:
        futures = {client.submit(simulate_point, r, pure=False): i for i, r in todo.items()}
        for fut in as_completed(futures):
            record(futures[fut], fut.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def write_sweep(
    table: pd.DataFrame, summaries: list[dict[str, Any]], name: str, out_root: str | Path
) -> Path:
    """Write ``<out_root>/<name>/<time>-sweep/`` with sweep.parquet, summaries.json and a
    report.html: the headline of every point that ran, then each metric against the points."""

    from moesim.results.report import headline_table, html_page
    from moesim.results.writer import write_folder
    from moesim.study.compare import METRICS

    grid = [c for c in table.columns if c not in METRICS and c != "error"]
    ran = {
        ", ".join(f"{c}={row[c]}" for c in grid) or f"point {i}": s
        for i, (row, s) in enumerate(zip(table.to_dict("records"), summaries, strict=True))
        if "error" not in s and s.get("mode") != "serve"  # serving runs have no step headline
    }

    def fill(tmp: Path) -> None:
        table.to_parquet(tmp / "sweep.parquet", index=False)
        (tmp / "summaries.json").write_text(
            jsonout.dumps(summaries, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        page = html_page(
            f"moesim sweep: {name}",
            f"{len(table)} grid points",
            [sweep_figure(table)],
            table.to_html(index=False, float_format=lambda v: f"{v:,.4g}"),
            head=headline_table(ran, by_row=True) if ran else "",
        )
        (tmp / "report.html").write_text(page, encoding="utf-8")

    return write_folder(Path(out_root) / name, "sweep", fill)


def sweep_figure(table: pd.DataFrame) -> Any:
    """Each metric against the grid points (one bar per point)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from moesim.study.compare import METRICS

    keys = [c for c in table.columns if c not in METRICS and c != "error"]
    labels = [
        ", ".join(f"{k.rsplit('.', 1)[-1]}={row[k]}" for k in keys) for _, row in table.iterrows()
    ]
    metrics = [m for m in METRICS if m in table.columns]
    if "output_tok_s_per_gpu" in metrics:
        return _serving_curve(table, labels)
    fig = make_subplots(rows=len(metrics), cols=1, subplot_titles=[METRICS[m][0] for m in metrics])
    for i, m in enumerate(metrics):
        fig.add_trace(go.Bar(x=labels, y=table[m], showlegend=False), row=i + 1, col=1)
    fig.update_layout(height=260 * len(metrics), title="Sweep")
    return fig


def _serving_curve(table: pd.DataFrame, labels: list[str]) -> Any:
    """Throughput against latency, one point per grid point (a sweep over request rate or
    concurrency traces the curve a deployment moves along as its load grows)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("TPOT", "TTFT"))
    x = table["output_tok_s_per_gpu"]
    for col, (p50, p99) in enumerate(
        (("tpot_p50_ms", "tpot_p99_ms"), ("ttft_p50_ms", "ttft_p99_ms")), 1
    ):
        for name, dash in ((p50, None), (p99, "dot")):
            fig.add_trace(
                go.Scatter(
                    x=x, y=table[name], text=labels, mode="lines+markers", name=name,
                    line={"dash": dash},
                ),
                row=1,
                col=col,
            )  # fmt: skip
        fig.update_xaxes(title_text="output tokens/s per GPU", row=1, col=col)
        fig.update_yaxes(title_text="ms", row=1, col=col)
    fig.update_layout(title="Throughput against latency", height=450)
    return fig
