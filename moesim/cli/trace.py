"""``moesim trace``: capture, import, analyse and synthesise routing traces."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from moesim import jsonout
from moesim.cli.errors import reported

trace_app = typer.Typer(
    help="Routing traces: capture from PyTorch, import vLLM/Megatron logs, statistics, "
    "fitted synthetic traces. Format: moesim/traces/format.py.",
    no_args_is_help=True,
)

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Trace file to write (.parquet).")]


def refuse_existing(path: Path, what: str = "a trace", option: str = "--out") -> None:
    """The trace format's refusal to overwrite (imported when a command runs, not at start-up)."""
    from moesim.traces.format import refuse_existing as refuse

    refuse(path, what, option)


def _wrote(path: Path, trace: Any) -> None:
    typer.echo(
        f"wrote {path}: {trace.rows:,} rows ({trace.assignments:,} assignments), "
        f"{trace.meta.num_experts} experts, top-{trace.meta.top_k}, "
        f"layers {', '.join(str(int(x)) for x in trace.layers())} of {trace.meta.num_layers}"
    )


@trace_app.command("capture")
def capture_cmd(
    model: Annotated[
        str, typer.Option(help="Hugging Face model id, or a local directory with config.json.")
    ],
    text: Annotated[Path, typer.Option(help="Text file, or a directory of text files.")],
    out: OutOpt,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help="bf16, fp16 or fp32.")] = "fp32",
    max_tokens: Annotated[int, typer.Option(help="Tokens of text to run.")] = 8192,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 4,
    logits: Annotated[bool, typer.Option(help="Also record full router logits.")] = False,
) -> None:
    """Run MODEL over TEXT and record every MoE layer's routing (needs the trace extra)."""
    with reported():
        refuse_existing(out)
        if dtype not in ("bf16", "fp16", "fp32"):
            from moesim.errors import ConfigError

            raise ConfigError(None, "--dtype", f"'{dtype}' is not one of bf16, fp16, fp32")
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            from moesim.errors import MoesimError

            raise MoesimError(
                "trace capture needs torch and transformers: pip install 'moesim[trace]'"
            ) from None
        from rich.progress import Progress

        from moesim.traces.hf import capture_text

        with Progress(transient=True) as prog:
            task = prog.add_task("capturing", total=None)
            trace = capture_text(
                model,
                text,
                device,
                dtype,
                max_tokens,
                seq_len,
                batch_size,
                logits,
                progress=lambda n: prog.advance(task, n),
            )
        trace.write(out)
        _wrote(out, trace)


@trace_app.command("import")
def import_cmd(
    kind: Annotated[str, typer.Argument(help="vllm, megatron or npy.")],
    src: Annotated[Path, typer.Argument(help="Log file, or a directory of log files.")],
    out: OutOpt,
    num_experts: Annotated[
        int | None, typer.Option(help="Experts per layer (default: from the model, or max id + 1).")
    ] = None,
    num_layers: Annotated[
        int | None, typer.Option(help="MoE layers of the model (default: from the model).")
    ] = None,
    micro_batch: Annotated[int, typer.Option(help="megatron: sequences per micro-batch.")] = 1,
    seq_len: Annotated[int | None, typer.Option(help="npy: tokens per sequence.")] = None,
    model: Annotated[str, typer.Option(help="Model name for the metadata (megatron, npy).")] = "",
) -> None:
    """Convert another tool's routing log into a moesim trace."""
    from moesim.traces.importers import IMPORTERS

    with reported():
        refuse_existing(out)
        importer = IMPORTERS.get(kind)
        kwargs: dict[str, Any] = {
            "num_experts": num_experts,
            "num_layers": num_layers,
            "micro_batch": micro_batch,
            "seq_len": seq_len,
        }
        if model:
            kwargs["model"] = model
        report = importer(src, **kwargs)
        for note in report.notes:
            typer.echo(note)
        report.trace.write(out)
        _wrote(out, report.trace)


@trace_app.command("stats")
def stats_cmd(
    trace: Annotated[Path, typer.Argument(help="Trace file (.parquet).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print all statistics as JSON.")] = False,
    report: Annotated[
        Path | None, typer.Option(help="Write a plotly report (load and affinity heatmaps).")
    ] = None,
) -> None:
    """Load balance per layer, aux loss, cross-layer affinity, reuse."""
    from moesim.traces.format import read_trace
    from moesim.traces.stats import stats_figure, trace_stats

    with reported():
        if report is not None:
            refuse_existing(report, "a report", "--report")
        stats = trace_stats(read_trace(trace))
        if json_out:
            sys.stdout.write(jsonout.dumps(stats, indent=1, sort_keys=True) + "\n")
        else:
            _print_stats(stats)
        if report is not None:
            stats_figure(stats).write_html(report, include_plotlyjs=True)
            typer.echo(f"report: {report}", err=json_out)


def _print_stats(stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = stats["trace"]
    console = Console()
    console.print(
        f"[bold]{t['model']}[/] ({t['source']}): {t['tokens']:,} tokens, {t['sequences']:,} "
        f"sequences, {t['steps']:,} steps; {t['num_experts']} experts, top-{t['top_k']}, "
        f"layers {', '.join(map(str, t['layers_present']))} of {t['num_layers']}"
    )
    table = Table(
        "layer",
        "max/mean",
        "CV",
        "Gini",
        "entropy",
        "aux loss",
        "used",
        "diversity",
        "step reuse",
        "token reuse",
        "drop",
    )
    for row in stats["layers"]:
        table.add_row(
            str(row["layer"]),
            f"{row['max_over_mean']:.2f}",
            f"{row['cv']:.3f}",
            f"{row['gini']:.3f}",
            f"{row['entropy']:.3f}",
            f"{row['aux_loss']:.3f}",
            str(row["experts_used"]),
            f"{row['diversity']:.3f}",
            f"{row['step_reuse']:.3f}",
            f"{row['token_reuse']:.3f}",
            f"{row['drop_rate']:.1%}",
        )
    console.print(table)
    if stats["affinity"]:
        aff = Table("layers", "mean max P(j | i)", "dependence (TV from independent)")
        for a in stats["affinity"]:
            aff.add_row(
                f"{a['from']} -> {a['to']}",
                f"{a['top1_conditional']:.3f}",
                f"{a['dependence']:.3f}",
            )
        console.print(aff)
    aux_from = {row["aux_loss_from"] for row in stats["layers"]}
    console.print(f"aux loss from {', '.join(sorted(aux_from))}; 1.0 is perfect balance")


@trace_app.command("synth")
def synth_cmd(
    fit: Annotated[
        Path, typer.Option(help="Trace (.parquet) or published counts (.json) to fit to.")
    ],
    out: OutOpt,
    tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 100_000,
    domain: Annotated[str | None, typer.Option(help="Domain of a counts file.")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed of the generator.")] = 0,
) -> None:
    """Write a synthetic trace from a generator fitted to FIT (loads and cross-layer affinity)."""
    from moesim.traces.fit import load_fit, synthesize

    with reported():
        refuse_existing(out)
        fitted = load_fit(fit, domain)
        trace = synthesize(fitted, tokens, seq_len, seed)
        trace.write(out)
        _wrote(out, trace)
