"""``moesim calibrate``: measure a device, fit the expert-time tables, write a profile."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from moesim.cli.errors import reported

if TYPE_CHECKING:
    from moesim.calibration.plan import Plan, PlanCost
    from moesim.hardware.profile import HardwareProfile

GPU_MAX_TOKENS = 16384
CPU_MAX_TOKENS = 256


def calibrate(
    out: Annotated[
        Path,
        typer.Option(help="Profile to write, e.g. hardware_profiles/h100-sxm-calibrated.yaml."),
    ],
    profile: Annotated[
        str | None,
        typer.Option(
            help="Base profile (name or path) whose datasheet figures are kept (default "
            "h100-sxm; with --from aiconfigurator, the shipped profile of --system)."
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(help="Model whose expert shape to measure (repeatable; preset or config)."),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="cuda (bundled CUDA C++ microbenchmark, built with nvcc), torch (PyTorch, on "
            "CUDA when present), or cpu (NumPy; the whole pipeline without a GPU). With --from "
            "aiconfigurator: the serving framework whose kernels were measured (sglang, vllm, "
            "trtllm; cuda means sglang)."
        ),
    ] = "cuda",
    source: Annotated[
        str,
        typer.Option(
            "--from",
            help="device: measure this machine; aiconfigurator: import NVIDIA's measured "
            "kernel tables from the aiconfigurator-core package (pip install "
            "'moesim[aiconfigurator]') for --model on --system.",
        ),
    ] = "device",
    system: Annotated[
        str,
        typer.Option(
            help="With --from aiconfigurator: the measured system (h100_sxm, h200_sxm, "
            "b200_sxm, a100_sxm, l40s, ...)."
        ),
    ] = "h100_sxm",
    data: Annotated[
        Path | None,
        typer.Option(
            help="With --from aiconfigurator: its systems/data folder, when the package "
            "is not installed."
        ),
    ] = None,
    dtype: Annotated[
        list[str] | None,
        typer.Option(
            help="Dtypes to measure (repeatable; default: bf16 and fp8 where the GPU "
            "has fp8, fp32 on the CPU)."
        ),
    ] = None,
    tp: Annotated[int, typer.Option(help="Tensor-parallel split of the expert width.")] = 1,
    experts: Annotated[int, typer.Option(help="Experts in each grouped call.")] = 8,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            help=f"Largest tokens per expert (default {GPU_MAX_TOKENS} on a GPU, "
            f"{CPU_MAX_TOKENS} on the CPU)."
        ),
    ] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats per case (median kept).")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed calls before timing.")] = 3,
    copy_mib: Annotated[
        int | None,
        typer.Option(
            help="Bytes of the memory-bandwidth copy, MiB (default 1024 on a GPU, 256 on the CPU)."
        ),
    ] = None,
    results: Annotated[
        Path, typer.Option(help="Folder for the raw measurements and their plot.")
    ] = Path("results/calibration"),
    seed: Annotated[int, typer.Option(help="Seed of the inputs and uneven token vectors.")] = 0,
) -> None:
    """Measure expert FFN times, memory, host-link and launch costs on this machine's device;
    fit the calibrated cost model; write the raw file, a plot, and a profile citing them."""
    from rich.console import Console
    from rich.table import Table

    from moesim.calibration.backends import default_dtypes
    from moesim.calibration.plan import make_plan, shapes_for
    from moesim.calibration.run import HOLDOUT_TARGET
    from moesim.calibration.run import calibrate as run_calibration
    from moesim.cli.render import progress_bar
    from moesim.errors import CalibrationError
    from moesim.hardware.catalog import find_profile, load_profile
    from moesim.models.presets import resolve_model
    from moesim.timing.costs import projection_shapes

    if source not in ("device", "aiconfigurator"):
        with reported():
            from moesim.errors import CalibrationError

            raise CalibrationError(f"--from must be device or aiconfigurator, got {source!r}")
    if source == "aiconfigurator":
        framework = "sglang" if backend == "cuda" else backend
        import_aiconfigurator(out, profile, model, framework, system, data, tp)
        return
    profile = profile or "h100-sxm"
    with reported():
        on_cpu = backend == "cpu" or (backend == "torch" and not _torch_cuda())
        dtypes = dtype or default_dtypes(backend)
        shapes, projections = [], []
        for name in model or ["mixtral-8x7b"]:
            spec = resolve_model(name)
            shapes += [s for s in shapes_for(spec, tp, dtypes) if s not in shapes]
            projections += projection_shapes(spec, tp)
        try:
            plan = make_plan(
                shapes,
                experts,
                max_tokens or (CPU_MAX_TOKENS if on_cpu else GPU_MAX_TOKENS),
                seed=seed,
                repeats=repeats,
                warmup=warmup,
                copy_bytes=(copy_mib or (256 if on_cpu else 1024)) << 20,
                gemm_shapes=projections,
            )
        except ValueError as e:
            raise CalibrationError(str(e)) from e
        base = find_profile(profile)
        check_plan(plan, backend, on_cpu, load_profile(str(base)))
        with progress_bar(len(plan.cases), "cases", "measuring") as hook:
            done = [0]

            def tick(_label: str) -> None:
                done[0] += 1
                hook(done[0], len(plan.cases))

            result = run_calibration(plan, backend, base, out, results, seed, tick)
        doc = result.document
        console = Console()
        t = Table(title=f"calibration on {doc['device']} ({doc['backend']})")
        t.add_column("shape", no_wrap=True)
        for col in ("experts", "cases", "held out", "fit median", "held-out max", "check"):
            t.add_column(col, no_wrap=True)
        for row in result.summary_rows():
            ok = row["holdout_max_abs_error"] <= HOLDOUT_TARGET
            t.add_row(
                row["shape"],
                str(row["experts"]),
                str(row["cases"]),
                str(row["holdout_cases"]),
                f"{row['fit_median_abs_error']:.1%}",
                f"{row['holdout_max_abs_error']:.1%}",
                "[green]within 10%[/]" if ok else "[red]over 10%[/]",
            )
        console.print(t)
        console.print(f"memory copy: {doc['memory']['gb_per_s']:.1f} GB/s (read + written)")
        link = doc["host_link"]
        console.print(
            "host link: "
            + (
                link["skipped"]
                if "skipped" in link
                else f"H2D {link['h2d_gb_per_s']:.1f} GB/s, D2H {link['d2h_gb_per_s']:.1f}"
                f" GB/s, H2D during GEMM {link['h2d_during_gemm_gb_per_s']:.1f} GB/s"
            )
        )
        console.print(f"launch overhead: {doc['launch']['seconds'] * 1e6:.2f} us")
        gemms = doc.get("gemm", [])
        console.print(f"dense GEMMs: {len(gemms)} measured, written as kernels.gemm tables")
        console.print(f"wrote {result.raw_path}, {result.plot_path}, {result.profile_path}")


def import_aiconfigurator(
    out: Path,
    profile: str | None,
    models: list[str] | None,
    backend: str,
    system: str,
    data: Path | None,
    tp: int,
) -> None:
    """Write a profile whose kernel tables come from AIConfigurator's measurements."""
    import yaml
    from rich.console import Console

    from moesim.calibration.aiconfigurator import (
        SYSTEM_PROFILES,
        dump,
        find_data,
        imported_profile,
    )
    from moesim.calibration.run import check_out_profile, write_atomic
    from moesim.errors import CalibrationError
    from moesim.hardware.catalog import find_profile
    from moesim.hardware.profile import HardwareProfile
    from moesim.models.presets import resolve_model

    with reported():
        if not models:
            raise CalibrationError("--from aiconfigurator needs --model (repeatable)")
        check_out_profile(out)
        base_name = profile or SYSTEM_PROFILES.get(system)
        if base_name is None:
            raise CalibrationError(
                f"no shipped profile for system {system!r}; name one with --profile "
                f"(shipped: {', '.join(f'{k} -> {v}' for k, v in SYSTEM_PROFILES.items())})"
            )
        specs = [resolve_model(m) for m in models]
        base_path = find_profile(base_name)
        base = yaml.safe_load(base_path.read_text(encoding="utf-8"))
        src = find_data(data)
        doc = imported_profile(base, src, system, backend, specs, tp, out.stem)
        try:
            HardwareProfile.model_validate(doc)
        except ValueError as e:
            raise CalibrationError(f"the imported profile does not validate: {e}") from e
        write_atomic(out, dump(doc))
        console = Console(highlight=False, soft_wrap=True)
        k = doc["kernels"]
        for t in k["gemm"]:
            console.print(f"gemm {t['dtype']}: {len(t['points'])} measured points ({t['kernel']})")
        for t in k["attention"]:
            console.print(f"attention {t['kind']}: {t['kernel']}")
        console.print(f"wrote {out} (base {base_path.name}; {src.cite})")


def check_plan(plan: Plan, backend: str, on_cpu: bool, base: HardwareProfile) -> PlanCost:
    """Print what the plan will cost; refuse one that would not fit the device's memory."""
    from rich.console import Console

    from moesim.calibration.plan import plan_cost
    from moesim.dtypes import ELEMENT_BYTES
    from moesim.errors import CalibrationError
    from moesim.estimate import available_memory

    sizes = {d: 4.0 if backend == "cpu" else ELEMENT_BYTES[d] for d in ELEMENT_BYTES}
    if on_cpu:
        rate, memory, where = cpu_flops_per_s(), available_memory(), "this machine's free memory"
    else:
        rate = base.peak_flops("bf16") * base.gpu.matmul_efficiency
        memory, where = base.gpu.hbm_bytes, f"{base.gpu.model} HBM (profile {base.name})"
    cost = plan_cost(plan, rate, sizes)
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"plan: {len(plan.cases)} cases of {len(plan.shapes())} expert shape(s), {cost.describe()}"
    )
    if cost.peak_bytes > 0.8 * memory:
        raise CalibrationError(
            f"the plan needs {cost.peak_bytes / 2**30:.1f} GiB at once but {where} is "
            f"{memory / 2**30:.1f} GiB; shrink it with --max-tokens or --experts (or --copy-mib, "
            "or one --model at a time)"
        )
    return cost


def cpu_flops_per_s() -> float:
    """FP32 matmul FLOP/s of this machine's CPUs, from one short NumPy measurement."""
    import time

    import numpy as np

    a = np.ones((256, 512), dtype=np.float32)
    b = np.ones((512, 512), dtype=np.float32)
    a @ b
    start = time.perf_counter()
    for _ in range(8):
        a @ b
    return 8 * 2 * 256 * 512 * 512 / max(time.perf_counter() - start, 1e-9)


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
