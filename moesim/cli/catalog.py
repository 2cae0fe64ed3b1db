"""``moesim models`` and ``moesim profiles``: list and show what is bundled."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from moesim import jsonout
from moesim.cli.errors import reported

if TYPE_CHECKING:
    from moesim.hardware.profile import HardwareProfile

models_app = typer.Typer(help="Model presets.", no_args_is_help=True)
profiles_app = typer.Typer(help="Hardware profiles.", no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@models_app.command("list")
def models_list() -> None:
    """List model presets with their expert layout."""
    from moesim.models.presets import load_preset, preset_names

    t = Table("name", "layers", "hidden", "experts", "top-k", "shared", "params", "active")
    for name in preset_names():
        m = load_preset(name)
        t.add_row(
            name,
            str(m.num_layers),
            str(m.hidden_size),
            str(m.moe.num_experts),
            str(m.moe.top_k),
            str(m.moe.num_shared_experts),
            f"{m.total_params() / 1e9:.1f}B",
            f"{m.active_params() / 1e9:.1f}B",
        )
    Console().print(t)


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(help="Preset name or config path.")],
    json_out: JsonOpt = False,
) -> None:
    """Show one model (a preset, an HF config.json or a model YAML)."""
    from moesim.models.presets import resolve_model

    with reported():
        m = resolve_model(name)
        data = m.model_dump(mode="json")
        data["derived"] = {
            "total_params": m.total_params(),
            "active_params": m.active_params(),
            "moe_layers": list(m.moe_layers),
        }
        if json_out:
            typer.echo(jsonout.dumps(data, indent=2))
            return
        Console().print_json(jsonout.dumps(data))


@profiles_app.command("list")
def profiles_list() -> None:
    """List hardware profiles."""
    from moesim.hardware.catalog import load_profile, profile_names

    t = Table("name", "GPU", "HBM", "bf16 TFLOP/s", "GPUs/node", "intra-node", "NIC/GPU")
    with reported():
        for name in profile_names():
            p = load_profile(name)
            intra = (
                f"{p.node.interconnect} {p.node.nvlink_gb_per_s:g} GB/s"
                if p.node.interconnect != "pcie"
                else f"pcie {p.node.pcie_gb_per_s:g} GB/s"
            )
            t.add_row(
                name,
                p.gpu.model,
                f"{p.gpu.hbm_bytes / 1e9:g} GB",
                f"{p.gpu.peak_dense_tflops.get('bf16', 0):g}",
                str(p.node.gpus_per_node),
                intra,
                f"{p.node.nic_gb_per_s:g} GB/s",
            )
    Console().print(t)


@profiles_app.command("show")
def profiles_show(
    name: Annotated[str, typer.Argument(help="Profile name or path.")],
    json_out: JsonOpt = False,
    topology: Annotated[bool, typer.Option("--topology", help="Draw the network to HTML.")] = False,
    nodes: Annotated[int, typer.Option(help="Nodes to draw with --topology.")] = 2,
    out: Annotated[
        Path | None,
        typer.Option(help="HTML file for --topology (default: <profile>-topology.html)."),
    ] = None,
) -> None:
    """Show one profile with the source of every figure, or draw its network (--topology)."""
    from moesim.hardware.catalog import load_profile

    with reported():
        profile = load_profile(name)
        if topology:
            _draw(profile, nodes, out or Path(f"{profile.name}-topology.html"))
            return
        data = profile.model_dump(mode="json")
        if json_out:
            typer.echo(jsonout.dumps(data, indent=2))
            return
        Console().print_json(jsonout.dumps(data))


def _draw(profile: HardwareProfile, nodes: int, out: Path) -> None:
    """Write the topology figure to ``out`` (refusing to overwrite a file)."""
    from moesim.errors import MoesimError
    from moesim.hardware.draw import topology_figure
    from moesim.hardware.topology import Topology

    if out.exists():
        raise MoesimError(f"{out} exists; choose another --out")
    if nodes < 1:
        raise MoesimError(f"--nodes must be at least 1, got {nodes}")
    topology_figure(Topology(profile, nodes)).write_html(out, include_plotlyjs=True)
    Console().print(f"topology of {profile.name} ({nodes} nodes): [bold]{out}[/]")
