"""``moesim``: run, check, and browse models and hardware profiles.

Commands import the simulator lazily so that ``moesim --help`` stays fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from moesim import jsonout
from moesim.cli import catalog
from moesim.cli.calibrate import calibrate
from moesim.cli.errors import reported
from moesim.cli.trace import trace_app

app = typer.Typer(
    name="moesim",
    help="Simulate Mixture-of-Experts models on GPU clusters: routing, all-to-all, load "
    "imbalance, token drops, placement. Start with: moesim run scenarios/quickstart.yaml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(catalog.models_app, name="models")
app.add_typer(catalog.profiles_app, name="profiles")
app.add_typer(trace_app, name="trace")
app.command(name="calibrate")(calibrate)

SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a field: key.path=value (repeatable), e.g. "
        "--set workload.batch_size=512 --set policies.capacity.type=dropless",
    ),
]


@app.command()
def run(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file.")],
    overrides: SetOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Results root (default: the scenario's output.dir, 'results')."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print summary.json to stdout.")] = False,
    no_write: Annotated[
        bool, typer.Option("--no-write", help="Simulate only; write no run folder.")
    ] = False,
) -> None:
    """Simulate SCENARIO and write results/<scenario>/<run-id>/."""
    from moesim.cli.render import print_summary, progress_bar, warn_if_long
    from moesim.config.loading import load_scenario
    from moesim.estimate import estimate
    from moesim.results.writer import output_root
    from moesim.runner import simulate, write_run

    with reported():
        resolved = load_scenario(scenario, overrides or [])
        if not no_write:
            out = output_root(
                out if out is not None else resolved.scenario.output.dir,
                "--out" if out is not None else f"{scenario}: output.dir",
            )
        if resolved.scenario.workload.mode == "serve":
            _serve(resolved, out, json_out, no_write)
            return
        warn_if_long(resolved, estimate(resolved))
        with progress_bar(resolved.scenario.workload.steps, resolved.scenario.name) as tick:
            result = simulate(resolved, progress=tick)
        folder = None if no_write else write_run(result, out)
        _emit(result.summary, folder, json_out, print_summary)


def _serve(resolved: Any, out: Path | None, json_out: bool, no_write: bool) -> None:
    """A serving scenario's run: requests through the instances (moesim.serving)."""
    from moesim.cli.render import print_serving
    from moesim.serving.report import write_serving_run
    from moesim.serving.run import simulate_serving

    result = simulate_serving(resolved)
    folder = None if no_write else write_serving_run(result, out)
    _emit(result.summary, folder, json_out, print_serving)


def _emit(
    summary: dict[str, Any], folder: Path | None, json_out: bool, show: Callable[..., None]
) -> None:
    """summary.json on stdout (``--json``, the folder on stderr), or the table."""
    from moesim.results.writer import summary_json

    if json_out:
        sys.stdout.write(summary_json(summary))
        if folder is not None:
            typer.echo(f"run folder: {folder}", err=True)
    else:
        show(summary, folder)


@app.command()
def check(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file.")],
    overrides: SetOpt = None,
) -> None:
    """Validate SCENARIO (fields, model, hardware, layout, HBM fit) without running it."""
    from moesim.cli.render import print_check, warn_if_long
    from moesim.config.loading import load_scenario
    from moesim.estimate import check_machine, estimate
    from moesim.timing.memory import check_fits, hbm_usage

    with reported():
        r = load_scenario(scenario, overrides or [])
        usage = hbm_usage(r, r.slots_per_rank)
        check_fits(r, usage, r.slots_per_rank)
        work = estimate(r)
        check_machine(r, work)
        print_check(r, usage, work)
        warn_if_long(r, work)


@app.command()
def compare(
    entries: Annotated[
        list[Path], typer.Argument(help="Scenario YAML files and/or run folders to compare.")
    ],
    overrides: SetOpt = None,
    out: Annotated[
        Path, typer.Option(help="Results root; the report goes to <out>/compare/<run-id>/.")
    ] = Path("results"),
    json_out: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
    no_write: Annotated[bool, typer.Option("--no-write", help="Write no report folder.")] = False,
) -> None:
    """Compare scenarios (simulated now) or earlier runs: a table and a plotly report.

    Columns: step time, tokens/s, exposed communication, imbalance (max/mean tokens per GPU),
    drop rate, HBM per GPU, offload stalls and inter-node bytes. --set applies to every
    scenario file.
    """
    from moesim.cli.render import print_comparison, progress_bar
    from moesim.study.compare import compare as run_compare
    from moesim.study.compare import write_compare

    with reported():
        with progress_bar(len(entries), "comparison") as tick:
            table, summaries = run_compare(list(entries), overrides or [], tick)
        folder = None if no_write else write_compare(table, summaries, out)
        if json_out:
            sys.stdout.write(table.to_json(orient="records", indent=2) + "\n")
        else:
            print_comparison(table)
        if folder is not None:
            typer.echo(f"report: {folder / 'report.html'}", err=json_out)


@app.command()
def sweep(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file.")],
    grid: Annotated[
        list[str],
        typer.Option(
            "--grid",
            "-g",
            help="key.path=v1,v2,... (repeatable; the grid is the Cartesian product), e.g. "
            "--grid policies.placement.type=contiguous,eplb --grid parallelism.ep=8,16",
        ),
    ],
    overrides: SetOpt = None,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            help="Local processes, or workers of --scheduler local (default: CPUs, at most 8).",
        ),
    ] = 0,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Run the points on Dask: a scheduler address (tcp://host:8786), or 'local' for "
            "a local Dask cluster. Needs moesim[distributed] here and on the workers; files the "
            "scenario names must be readable at the same path on the workers.",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Results root (default: the scenario's output.dir, 'results')."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the table as JSON.")] = False,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Points folder of an interrupted sweep (same scenario, --grid and --set): "
            "run only the points it lacks.",
        ),
    ] = None,
) -> None:
    """Run SCENARIO over a grid of overrides (local processes or Dask) into one Parquet table.

    Writes results/<scenario>/<run-id>-sweep/ (sweep.parquet, summaries.json, report.html).
    Each finished point is saved at once in <run-id>-sweep.points/; an interrupted sweep
    resumes with --resume that folder. A grid point that fails keeps its error in the table;
    the exit code is then 1.
    """
    import os

    from moesim.cli.render import print_sweep, progress_bar
    from moesim.config.loading import load_scenario
    from moesim.results.writer import output_root
    from moesim.study.compare import METRICS
    from moesim.study.sweep import PointStore, expand_grid, run_sweep, write_sweep

    with reported():
        base = load_scenario(scenario, overrides or [])  # fail early on a bad scenario
        points = expand_grid(grid)
        root = output_root(
            out if out is not None else base.scenario.output.dir,
            "--out" if out is not None else f"{scenario}: output.dir",
        )
        plan = PointStore.plan_of(scenario, [(overrides or []) + p for p in points])
        if resume is not None:
            store = PointStore.resume(resume, plan)
        else:
            store = PointStore.create(root / base.scenario.name, plan)
        typer.echo(
            f"finished points are saved in {store.folder}; if interrupted, add "
            f"--resume {store.folder}",
            err=True,
        )
        n_jobs = jobs or min(os.cpu_count() or 1, 8, len(points))
        with progress_bar(len(points), f"sweep of {base.scenario.name}") as tick:
            table, summaries = run_sweep(
                scenario, grid, overrides or [], n_jobs, tick, scheduler, store
            )
        folder = write_sweep(table, summaries, base.scenario.name, root)
        store.remove()
        if json_out:
            sys.stdout.write(table.to_json(orient="records", indent=2) + "\n")
        else:
            print_sweep(table, f"moesim sweep: {base.scenario.name}")
        typer.echo(f"sweep folder: {folder}", err=json_out)
        sys.stdout.flush()
        failed = table[table["error"] != ""]
        for _, row in failed.iterrows():
            grid_values = row.drop([c for c in (*METRICS, "error") if c in row.index]).to_dict()
            typer.echo(f"failed: {grid_values}: {row['error']}", err=True)
        if len(failed):
            raise typer.Exit(1)


@app.command()
def ops(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file.")],
    overrides: SetOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the ops as JSON.")] = False,
) -> None:
    """Per-op cost of one layer on one GPU (forward, and backward in training), with the table
    or model behind each op; expert loads spread evenly. Shares are of an MoE layer (attention,
    router, experts, shared experts), or of a dense layer for the dense FFN's ops."""
    from moesim.cli.render import print_layer_ops
    from moesim.config.loading import load_scenario
    from moesim.timing.costs import layer_ops, scenario_costs

    with reported():
        r = load_scenario(scenario, overrides)
        cm = scenario_costs(r)
        passes = [False, True] if r.scenario.workload.mode == "train" else [False]
        result = {("backward" if b else "forward"): layer_ops(r, b, cm) for b in passes}
        if json_out:
            doc = {"ops_s": result, "sources": dict(sorted(cm.sources.items()))}
            typer.echo(jsonout.dumps(doc, indent=2))
        else:
            print_layer_ops(r.scenario.name, r.hardware.name, result, cm.sources)


@app.command()
def validate(
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the benchmark routing.")] = 0,
    scenarios: Annotated[
        Path | None,
        typer.Option(help="Folder of the validation scenarios (default: scenarios/validation)."),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            help="Write an HTML report (predicted vs published, per-op breakdown of each case)."
        ),
    ] = None,
) -> None:
    """Predict published measurements (DeepEP normal kernels, end-to-end serving) from profile
    facts and print the errors; nothing is fitted to them. Also checks that every shipped
    kernel table is reproduced at its points."""

    from moesim.cli.render import print_e2e_validation, print_kernel_tables, print_validation
    from moesim.validation.deepep import validate_deepep
    from moesim.validation.e2e import SCENARIOS, validate_e2e
    from moesim.validation.kernels import validate_kernel_tables

    with reported():
        if report is not None and report.exists():
            from moesim.errors import ConfigError

            raise ConfigError(None, "--report", f"{report} exists; moesim never overwrites it")
        rows = validate_deepep(seed=seed)
        e2e = validate_e2e(scenarios or SCENARIOS)
        tables = validate_kernel_tables()
        if report is not None:
            from moesim.calibration.run import write_atomic
            from moesim.validation.report import validation_html

            write_atomic(report, validation_html(rows, e2e))
        if json_out:
            doc = {
                "deepep": [r.as_dict() for r in rows],
                "end_to_end": [r.as_dict() for r in e2e],
                "kernel_tables": [r.as_dict() for r in tables],
            }
            typer.echo(jsonout.dumps(doc, indent=2))
        else:
            print_kernel_tables(tables)
            print_validation(rows)
            print_e2e_validation(e2e)
            if report is not None:
                typer.echo(f"wrote {report}")


@app.command()
def schema(
    what: Annotated[
        str, typer.Argument(help="scenario (a scenario file) or profile (a hardware profile).")
    ] = "scenario",
) -> None:
    """Print the JSON Schema of a scenario (or a hardware profile), for editors that complete
    YAML (e.g. a `# yaml-language-server: $schema=...` line pointing at the saved output)."""
    from moesim.errors import ConfigError

    with reported():
        if what == "scenario":
            from moesim.config.scenario import Scenario as model
        elif what == "profile":
            from moesim.hardware.profile import HardwareProfile as model  # type: ignore[assignment]
        else:
            raise ConfigError(None, "what", f"expected scenario or profile, got {what!r}")
        doc = model.model_json_schema()
        doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        typer.echo(jsonout.dumps(doc, indent=2))


def main() -> None:
    """Console-script entry point."""
    app()
