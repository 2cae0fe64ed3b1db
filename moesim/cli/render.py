"""Rich tables and progress bars for the CLI."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from moesim.config.loading import ResolvedScenario
    from moesim.estimate import WorkEstimate
    from moesim.timing.memory import HBMUsage
    from moesim.validation.deepep import Row
    from moesim.validation.e2e import E2ERow
    from moesim.validation.kernels import TableRow

GiB = 1024**3


@contextmanager
def progress_bar(
    total: int, name: str, verb: str = "simulating"
) -> Iterator[Callable[[int, int], None]]:
    """A transient step progress bar on stderr; yields the ``progress(done, total)`` hook."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=total < 5 or not console.is_terminal,
    ) as prog:
        task = prog.add_task(f"{verb} {name}", total=total)
        yield lambda done, _total: prog.update(task, completed=done)


def print_summary(s: dict[str, Any], folder: Path | None) -> None:
    """The summary as a table, then where the run folder is."""
    from moesim.results.report import seconds_text

    console = Console()
    t = Table(
        title=f"moesim: {s['scenario']}  ({s['model']} on {s['gpus']}x {s['hardware']}, "
        f"{s['mode']})",
        show_header=False,
    )
    t.add_column("metric", style="bold")
    t.add_column("value", justify="right")
    t.add_row("step time", seconds_text(s["step_time_s"]))
    t.add_row("tokens/s", f"{s['tokens_per_s']:,.0f}")
    if "training" in s:
        tr = s["training"]
        t.add_row("tokens/s per GPU", f"{tr['tokens_per_s_per_gpu']:,.0f}")
        t.add_row(
            "model TFLOP/s per GPU (MFU)", f"{tr['model_tflops_per_gpu']:,.1f} ({tr['mfu']:.1%})"
        )
    if "pipeline" in s:
        p = s["pipeline"]
        t.add_row(
            f"pipeline bubble ({p['schedule']}, pp {p['pp']}, {p['micro_batches']} mb)",
            f"{seconds_text(p['bubble_s'])} ({p['bubble_fraction']:.1%})",
        )
    for k, v in s["breakdown_s"].items():
        if v > 0:
            t.add_row(f"  {k}", seconds_text(v))
    t.add_row("imbalance (max/mean)", f"{s['imbalance_max_over_mean']:.3f}")
    t.add_row("drop rate", f"{s['drop_rate']:.2%}")
    t.add_row("bytes intra-node / step", _bytes_text(s["bytes_intra_node"]))
    t.add_row("bytes inter-node / step", _bytes_text(s["bytes_inter_node"]))
    t.add_row(
        "HBM per GPU", f"{s['hbm_peak_bytes'] / GiB:.1f} / {s['hbm_capacity_bytes'] / GiB:.1f} GiB"
    )
    console.print(t)
    if folder is not None:
        console.print(f"run folder: [bold]{folder}[/]  (report: {folder / 'report.html'})")


def print_serving(s: dict[str, Any], folder: Path | None) -> None:
    """A serving run's metrics as a table, then where the run folder is."""
    sv = s["serving"]
    console = Console()
    kind = "disaggregated" if sv["disaggregated"] else "co-located"
    t = Table(
        title=f"moesim: {s['scenario']}  ({s['model']} on {s['gpus']}x {s['hardware']}, "
        f"serving, {kind})",
        show_header=False,
    )
    t.add_column("metric", style="bold")
    t.add_column("value", justify="right")
    t.add_row("requests finished / counted", f"{sv['finished']:,} / {sv['counted']:,}")
    t.add_row("request rate", f"{sv['request_rate_per_s']:,.2f} /s")
    t.add_row(
        "input tokens/s (per node)",
        f"{sv['input_tokens_per_s']:,.0f} ({sv['input_tokens_per_s_per_node']:,.0f})",
    )
    t.add_row(
        "output tokens/s (per node)",
        f"{sv['output_tokens_per_s']:,.0f} ({sv['output_tokens_per_s_per_node']:,.0f})",
    )
    t.add_row("output tokens/s per GPU", f"{sv['output_tokens_per_s_per_gpu']:,.1f}")
    for name in ("ttft_s", "tpot_s", "e2e_s", "queue_s"):
        v = sv[name]
        label = "queueing" if name == "queue_s" else name[:-2].upper()
        t.add_row(
            f"{label} mean / p50 / p90 / p99",
            " / ".join(f"{v[k] * 1e3:,.1f}" for k in ("mean", "p50", "p90", "p99")) + " ms",
        )
    t.add_row(
        "goodput (SLOs met)", f"{sv['goodput_requests_per_s']:,.2f} /s ({sv['slo_attained']:.1%})"
    )
    t.add_row("decode batch (mean)", f"{sv['decode_batch_mean']:,.1f}")
    t.add_row(
        "KV cache peak / capacity",
        f"{sv['kv_peak_tokens']:,} / {sv['kv_capacity_tokens']:,} tokens",
    )
    t.add_row("preemptions", f"{sv['preemptions']:,}")
    console.print(t)
    if folder is not None:
        console.print(f"run folder: [bold]{folder}[/]  (report: {folder / 'report.html'})")


def _bytes_text(n: float) -> str:
    """Bytes in MB, or GB from 100 GB on."""
    return f"{n / 1e9:,.1f} GB" if n >= 1e11 else f"{n / 1e6:,.2f} MB"


def warn_if_long(r: ResolvedScenario, work: WorkEstimate) -> None:
    """A warning on stderr before a run estimated to take more than a few minutes."""
    from moesim.estimate import WARN_S

    if work.seconds > WARN_S:
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"[bold yellow]warning:[/] {r.scenario.name} is a long run: {work.describe()}. "
            "Fewer workload.steps, layers or GPUs shorten it."
        )


def print_check(r: ResolvedScenario, usage: HBMUsage, work: WorkEstimate) -> None:
    """What ``moesim check`` found."""
    s = r.scenario
    par = s.parallelism
    console = Console()
    pp = f"pp={par.pp} " + (f"vpp={par.vpp} " if par.vpp > 1 else "") if par.pp > 1 else ""
    console.print(
        f"[green]ok[/] {s.name}: {r.model.name} on {s.cluster.nodes} x "
        f"{r.hardware.node.gpus_per_node} {r.hardware.gpu.model}, "
        f"{pp}dp={par.dp} ep={par.ep} tp={par.tp}, {s.workload.mode}"
    )
    parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in usage.as_dict().items() if k != "total")
    where = "per GPU of the fullest pipeline stage" if par.pp > 1 else "per GPU"
    console.print(
        f"HBM {where}: {usage.total / GiB:.1f} of {r.hardware.gpu.hbm_bytes / GiB:.1f}"
        f" GiB ({parts} GiB)"
    )
    console.print(f"Work: {work.describe()}")


def print_e2e_validation(rows: list[E2ERow]) -> None:
    """End-to-end cases: predicted vs published, with the relative error."""
    t = Table(title="End-to-end published measurements")
    for col in ("case", "profile", "counted as", "published", "predicted", "error", "step"):
        t.add_column(col, justify="left" if col in ("case", "profile", "counted as") else "right")
    for r in rows:
        colour = "green" if abs(r.error) <= 0.15 else "yellow"
        t.add_row(
            r.case,
            r.profile,
            r.counted_as,
            f"{r.published:,.0f}",
            f"{r.predicted:,.0f}",
            f"[{colour}]{r.error:+.1%}[/]",
            f"{r.step_time_s * 1e3:,.1f} ms",
        )
    Console().print(t)
    for case in dict.fromkeys(r.case for r in rows):
        source = next(r.source for r in rows if r.case == case)
        Console().print(f"  {case}: {source}")


def print_layer_ops(
    scenario: str,
    hardware: str,
    result: dict[str, dict[str, dict[str, float]]],
    sources: dict[str, str],
) -> None:
    """``moesim ops``: one table per direction, each op's microseconds, its share of an MoE
    layer (of a dense layer for the dense FFN's ops) and the table behind it."""
    for direction, blocks in result.items():
        t = Table(title=f"{scenario}: one layer, one GPU, {direction} ({hardware})")
        for col in ("block", "op", "us", "share", "source"):
            t.add_column(col, justify="right" if col in ("us", "share") else "left")
        sums = {b: sum(ops.values()) for b, ops in blocks.items()}
        moe = sum(v for b, v in sums.items() if b != "dense")  # an MoE layer
        for block, ops in blocks.items():
            layer = sums["attention"] + sums[block] if block == "dense" else moe
            for op, sec in sorted(ops.items(), key=lambda kv: -kv[1]):
                src = sources.get(op, "")
                t.add_row(block, op, f"{sec * 1e6:,.1f}", f"{sec / layer:.1%}", src[:60])
        t.add_row("", "MoE layer", f"{moe * 1e6:,.1f}", "100%", "")
        if "dense" in sums:
            dense = sums["attention"] + sums["dense"]
            t.add_row("", "dense layer", f"{dense * 1e6:,.1f}", "100%", "attention + dense")
        Console().print(t)


def print_kernel_tables(rows: list[TableRow]) -> None:
    """Each shipped kernel table reproduced at its points."""
    t = Table(title="Kernel tables of the shipped profiles, reproduced at their points")
    for col in ("profile", "table", "status", "points", "max error"):
        t.add_column(col, justify="right" if col in ("points", "max error") else "left")
    for r in rows:
        colour = "green" if r.max_error <= 0.05 else "red"
        t.add_row(r.profile, r.table, r.status, str(r.points), f"[{colour}]{r.max_error:.1e}[/]")
    Console().print(t)


def print_validation(rows: list[Row]) -> None:
    """Predicted vs published, with the relative error of each row."""
    t = Table(title="DeepEP normal kernels, H800 (published: deepseek-ai/DeepEP README)")
    for col in (
        "case",
        "phase",
        "counted as",
        "published GB/s",
        "predicted GB/s",
        "error",
        "phase time",
    ):
        t.add_column(col, justify="right" if col[0] in "ppe" and col != "phase" else "left")
    for r in rows:
        colour = "green" if abs(r.error) <= 0.15 else "yellow"
        t.add_row(
            f"{r.kind} EP{r.ep}",
            r.phase,
            r.bottleneck,
            f"{r.published_gb_per_s:.0f}",
            f"{r.predicted_gb_per_s:.1f}",
            f"[{colour}]{r.error:+.1%}[/]",
            f"{r.predicted_time_us:,.0f} us",
        )
    Console().print(t)


def _cell(col: str, v: Any) -> str:
    if col == "drop_rate":
        return f"{v:.2%}"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.3f}"
    return str(v)


def print_comparison(table: Any) -> None:
    """One column per run, one row per setting and metric (narrow enough for a terminal)."""
    from moesim.study.compare import METRICS

    t = Table(title="moesim compare")
    t.add_column("")
    for label in table["run"]:
        t.add_column(str(label), justify="right")
    for col in table.columns:
        if col in ("run", "scenario"):
            continue
        header = METRICS[col][0] if col in METRICS else col.replace("_", " ")
        t.add_row(header, *[_cell(col, v) for v in table[col]])
    Console().print(t)


def print_sweep(table: Any, title: str) -> None:
    """One row per grid point: the grid values (last key part as header), then the metrics."""
    from moesim.study.compare import METRICS

    short = {
        "request_rate": "req/s",
        "output_tok_s_per_gpu": "out tok/s/GPU",
        "ttft_p50_ms": "TTFT p50",
        "ttft_p99_ms": "TTFT p99",
        "tpot_p50_ms": "TPOT p50",
        "tpot_p99_ms": "TPOT p99",
        "goodput_rps": "goodput",
        "step_time_ms": "step ms",
        "tokens_per_s": "tok/s",
        "exposed_comm_ms": "exposed ms",
        "imbalance": "imbal.",
        "drop_rate": "drops",
        "hbm_gib": "HBM GiB",
        "offload_stall_ms": "stall ms",
        "inter_node_gb": "inter GB",
    }
    cols = [c for c in table.columns if c != "error"]
    t = Table(title=title)
    for c in cols:
        t.add_column(
            short.get(c, c.rsplit(".", 1)[-1]), justify="right" if c in METRICS else "left"
        )
    for _, row in table.iterrows():
        failed = bool(row.get("error"))
        t.add_row(
            *[("[red]failed[/]" if failed and c in METRICS else _cell(c, row[c])) for c in cols]
        )
    Console().print(t)
