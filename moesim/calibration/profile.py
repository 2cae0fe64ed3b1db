"""A calibrated hardware profile: the base profile with measured figures, each citing the raw file.

What changes (only what was measured; everything else keeps the base profile's figure and
source):

- ``gpu.kernel_launch_s``: the measured launch (or call) overhead;
- ``gpu.memory_efficiency``: measured copy bandwidth (bytes read plus written) over the
  datasheet ``hbm_bandwidth_gb_per_s``;
- ``gpu.matmul_efficiency``: the best measured expert-FFN FLOP/s over the datasheet peak of its
  dtype (the roofline fallback for shapes without a table);
- ``node.pcie_efficiency``: measured pinned host-to-device bandwidth over ``pcie_gb_per_s``;
- ``calibration``: the fitted expert tables (:class:`moesim.hardware.profile.Calibration`).

An efficiency above 1 (a device faster than the base datasheet) is capped at 1 and the source
says so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from moesim.calibration.plan import ExpertShape
from moesim.errors import CalibrationError
from moesim.hardware.profile import GemmTable


def _efficiency(measured: float, peak: float) -> tuple[float, str]:
    ratio = measured / peak
    if ratio > 1:
        return 1.0, f" (measured/datasheet = {ratio:.3f}, capped at 1)"
    return float(f"{ratio:.4g}"), ""


def gemm_tables(doc: dict[str, Any], cite: str) -> list[dict[str, Any]]:
    """The measured dense GEMMs as profile tables (``kernels.gemm``), one per dtype."""
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in doc.get("gemm", [])):
        rows = sorted(
            (r for r in doc["gemm"] if r["dtype"] == dtype), key=lambda r: (r["n"], r["k"], r["m"])
        )
        impl = ", ".join(sorted({r.get("impl", doc["backend"]) for r in rows}))
        where = cite.removeprefix("measured: ")
        out.append(
            {
                "kernel": f"{doc['backend']} ({impl})",
                "dtype": dtype,
                "layout": "dense",
                "status": "measured",
                "source": f"{where} (dense GEMMs, median of the timed repeats)",
                "points": [GemmTable.point(r["m"], r["n"], r["k"], r["seconds"]) for r in rows],
            }
        )
    return out


def calibrated_profile(
    base_path: Path, doc: dict[str, Any], out_path: Path, raw_path: Path
) -> dict[str, Any]:
    """The profile document to write at ``out_path`` (``raw_path`` is cited relative to it)."""
    try:
        data = yaml.safe_load(base_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise CalibrationError(f"{base_path}: cannot read the base profile: {e}") from e
    rel = os.path.relpath(raw_path.resolve(), out_path.resolve().parent)
    cite = f"measured: by `moesim calibrate --backend {doc['backend']}` on {doc['device']}, "
    cite += f"{doc['created']}; raw data {rel}"
    gpu, node, sources = data["gpu"], data["node"], data["sources"]
    base_name = data["name"]
    data["name"] = out_path.stem
    data["description"] = (
        f"{data['description']} Calibrated on {doc['device']} with backend {doc['backend']} "
        f"({doc['created']}) from profile {base_name}."
    )

    gpu["kernel_launch_s"] = float(f"{doc['launch']['seconds']:.4g}")
    sources["gpu.kernel_launch_s"] = f"{cite} (median launch overhead)."

    mem = doc["memory"]
    gpu["memory_efficiency"], note = _efficiency(mem["gb_per_s"], gpu["hbm_bandwidth_gb_per_s"])
    sources["gpu.memory_efficiency"] = (
        f"{cite}: {mem['gb_per_s']:.1f} GB/s device copy, bytes read plus written, over the "
        f"datasheet {gpu['hbm_bandwidth_gb_per_s']} GB/s{note}."
    )

    best, best_case = 0.0, None
    for r in doc["expert_ffn"]:
        shape = ExpertShape(r["hidden"], r["width"], r["matrices"], r["dtype"])
        peak = 1e12 * gpu["peak_dense_tflops"].get(r["dtype"], gpu["peak_dense_tflops"]["bf16"])
        frac = shape.flops(sum(r["counts"])) / r["seconds"] / peak
        if frac > best:
            best, best_case = frac, r
    if best_case is not None:
        gpu["matmul_efficiency"], note = _efficiency(best, 1.0)
        sources["gpu.matmul_efficiency"] = (
            f"{cite}: best expert FFN ({best_case['dtype']}, hidden {best_case['hidden']}, "
            f"width {best_case['width']}, {best_case['label']}) over the datasheet peak{note}."
        )

    link = doc.get("host_link", {})
    if "h2d_gb_per_s" in link:
        node["pcie_efficiency"], note = _efficiency(link["h2d_gb_per_s"], node["pcie_gb_per_s"])
        sources["node.pcie_efficiency"] = (
            f"{cite}: {link['h2d_gb_per_s']:.1f} GB/s pinned host-to-device over "
            f"{node['pcie_gb_per_s']} GB/s{note}."
        )

    data["calibration"] = {
        "backend": doc["backend"],
        "device": doc["device"],
        "created": doc["created"],
        "measurements": rel,
        "experts": [
            {
                **{k: fit[k] for k in ("hidden", "width", "matrices", "dtype")},
                "tokens": fit["tokens"],
                "seconds": [float(f"{s:.6g}") for s in fit["seconds"]],
                "overhead_s": float(f"{fit['overhead_s']:.6g}"),
                "holdout_cases": fit["holdout_cases"],
                "holdout_max_abs_error": round(fit["holdout_max_abs_error"], 4),
            }
            for fit in doc["fit"].values()
        ],
    }
    tables = gemm_tables(doc, cite)
    if tables:  # measured tables first: the first table of a dtype and layout is the one used
        kernels = data.setdefault("kernels", {})
        measured = {(t["dtype"], t["layout"]) for t in tables}
        kept = [t for t in kernels.get("gemm", []) if (t["dtype"], t["layout"]) not in measured]
        kernels["gemm"] = tables + kept
    # keep `sources` last, as in the hand-written profiles
    data["sources"] = data.pop("sources")
    return dict(data)
