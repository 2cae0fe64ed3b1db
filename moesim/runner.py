"""Running a scenario: the routing stage, the timing engine, and the results.

``simulate`` returns data (no files); ``write_run`` writes one run folder atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moesim.config.loading import ResolvedScenario
from moesim.errors import ConfigError
from moesim.estimate import check_machine, estimate
from moesim.metrics.collector import Collector
from moesim.metrics.links import links_summary, links_table
from moesim.metrics.summary import layers_table, offload_summary, summarize
from moesim.results.result import RunResult
from moesim.routing.stage import RoutingStage
from moesim.timing.costs import scenario_costs
from moesim.timing.engine import Engine, ProgressFn
from moesim.timing.memory import check_fits, hbm_usage, stage_usages
from moesim.timing.pipeline import pipelined, stage_scenario
from moesim.timing.stages import PipelineEngine


def simulate(r: ResolvedScenario, progress: ProgressFn | None = None) -> RunResult:
    """Run the scenario and return its results.

    Raises:
        CapacityError: the scenario does not fit in HBM.
    """
    s = r.scenario
    if s.workload.mode == "serve":
        raise ConfigError(
            r.path,
            "workload.mode",
            "a serving scenario runs with moesim.serving.run.simulate_serving (moesim run, "
            "compare and sweep call it for you)",
        )
    check_machine(r, estimate(r))
    usage = hbm_usage(r, r.slots_per_rank)
    check_fits(r, usage, r.slots_per_rank)  # before the routing stage sets anything up
    seeds = np.random.SeedSequence(s.seed).spawn(2)
    piped = pipelined(r)
    # pipeline stages are alike: the routing stage draws for one stage's replicas and ranks
    rs = stage_scenario(r).scenario if piped else s
    routing = RoutingStage(rs, r.model, r.gpus_per_node, np.random.default_rng(seeds[0]))
    costs = scenario_costs(r)
    col = Collector(
        s.workload.steps,
        r.model.num_layers,
        r.world,
        r.model.moe_layers,
        r.gpus_per_node,
        s.output.timeline_steps,
    )
    engine: Engine | PipelineEngine = (
        PipelineEngine(r, routing, costs, col) if piped else Engine(r, routing, costs, col)
    )
    counter = _count_events(engine)
    engine.run(progress)
    summary = summarize(r, col, usage, costs.source)
    if isinstance(engine, PipelineEngine):
        summary["pipeline"] = engine.summary() | {
            "stage_hbm_bytes": [u.total for u in stage_usages(r)]
        }
    summary["ops_s"] = {op: sec / s.workload.steps for op, sec in sorted(engine.ops_s.items())}
    summary["cost_sources"] = dict(sorted(costs.sources.items()))
    links = links_table(engine.topology, engine.net.records)
    summary["links"] = links_summary(links, s.workload.steps)
    if engine.offload is not None:
        summary["offload"] = offload_summary(r, col, engine.offload.stats(s.workload.steps))
    # SimPy events, or the lockstep walk's per-GPU resumptions
    events = counter() + (engine.lockstep_events if isinstance(engine, Engine) else 0)
    return RunResult(r, summary, layers_table(col), col, events, links)


def _count_events(engine: Engine | PipelineEngine) -> Any:
    """Wrap the environment's step() to count processed events."""
    env = engine.env
    count = [0]
    original = env.step

    def step() -> None:
        count[0] += 1
        original()

    env.step = step  # type: ignore[method-assign]
    return lambda: count[0]


def write_run(result: RunResult, out_root: str | Path | None = None) -> Path:
    """Write the run folder ``<out_root>/<scenario>/<run-id>/`` atomically; returns its path."""
    from moesim.results.writer import write_run_dir

    return write_run_dir(result, out_root)
