"""``moesim``: run, check, and browse models and hardware profiles.

Commands import the simulator lazily so that ``moesim --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from moesim.cli import catalog
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
    from moesim.cli.render import print_summary, progress_bar
    from moesim.config.loading import load_scenario
    from moesim.results.writer import summary_json
    from moesim.runner import simulate, write_run

    with reported():
        resolved = load_scenario(scenario, overrides or [])
        with progress_bar(resolved.scenario.workload.steps, resolved.scenario.name) as tick:
            result = simulate(resolved, progress=tick)
        folder = None if no_write else write_run(result, out)
        if json_out:
            sys.stdout.write(summary_json(result.summary))
            if folder is not None:
                typer.echo(f"run folder: {folder}", err=True)
        else:
            print_summary(result.summary, folder)


@app.command()
def check(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file.")],
    overrides: SetOpt = None,
) -> None:
    """Validate SCENARIO (fields, model, hardware, layout, HBM fit) without running it."""
    from moesim.cli.render import print_check
    from moesim.config.loading import load_scenario
    from moesim.routing.stage import RoutingStage
    from moesim.timing.memory import check_fits, hbm_usage

    with reported():
        r = load_scenario(scenario, overrides or [])
        import numpy as np

        slots = RoutingStage(
            r.scenario, r.model, r.gpus_per_node, np.random.default_rng(0)
        ).placement.slots_per_rank
        usage = hbm_usage(r, slots)
        check_fits(r, usage)
        print_check(r, usage)


@app.command()
def validate(
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the benchmark routing.")] = 0,
) -> None:
    """Predict published measurements (DeepEP normal kernels) and print the errors."""
    import json

    from moesim.cli.render import print_validation
    from moesim.validation.deepep import validate_deepep

    with reported():
        rows = validate_deepep(seed=seed)
        if json_out:
            typer.echo(json.dumps([r.as_dict() for r in rows], indent=2))
        else:
            print_validation(rows)


def main() -> None:
    """Console-script entry point."""
    app()
