"""Import measured kernel tables from NVIDIA's AIConfigurator data package into a profile.

``aiconfigurator-core`` (Apache-2.0, the ``aiconfigurator`` extra) ships per-op latencies that
NVIDIA measured on real systems (H100, H200, B200, GB200, A100, L40S, ...) for the SGLang,
TensorRT-LLM and vLLM kernels, as parquet files under
``aiconfigurator_core/systems/data/<system>/<op>/<backend>/<version>/``. This module converts
the tables one model needs into moesim's profile format (:class:`moesim.hardware.profile.Kernels`):

- ``gemm/gemm_perf.parquet`` -> GEMM tables (``[1, m, n, k, tflops]``) per dtype: the block-
  scaled FP8 GEMMs (DeepGEMM in SGLang) as ``fp8``, BF16 linear layers as ``bf16``; only the
  measured ``(n, k)`` grid points that bracket the model's projection shapes (and their
  transposes, for training's input gradients), at every measured ``m``;
- ``mla/context_mla_perf.parquet`` (MLA) or ``attention/context_attention_perf.parquet`` (GQA)
  -> the prefill attention table (``[seq_len, tflops]``, FLOPs counted as moesim counts them,
  so the measured latency is reproduced), at the model's heads per GPU;
- ``mla/generation_mla_perf.parquet`` or ``attention/generation_attention_perf.parquet`` -> the
  decode attention rates (the best achieved KV-cache GB/s and TFLOP/s);
- ``comm/wideep_deepep_normal_perf.parquet`` -> DeepEP's fixed cost per normal dispatch.

Every table cites the package, its version and the file it came from. The latest framework
version folder holding a file is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from moesim.errors import CalibrationError
from moesim.hardware.profile import GemmTable
from moesim.models.spec import ModelSpec
from moesim.timing.costs import projection_shapes

PACKAGE = "aiconfigurator-core"
SYSTEM_PROFILES = {
    "h100_sxm": "h100-sxm",
    "h200_sxm": "h200",
    "b200_sxm": "b200",
    "a100_sxm": "a100-sxm-80g",
    "l40s": "l40s-pcie",
}
"""AIConfigurator system -> the shipped moesim profile whose link and memory facts are kept."""
GEMM_DTYPES = {"fp8_block": ("fp8", "deepgemm"), "bfloat16": ("bf16", "linear")}
"""AIConfigurator GEMM dtype -> (moesim dtype, kernel family)."""


@dataclass(frozen=True)
class Data:
    """Where the tables are: the package's data folder, and how to cite it."""

    root: Path
    cite: str

    def latest(self, system: str, op: str, backend: str, file: str) -> Path:
        """The file in the newest framework version folder that holds it."""
        base = self.root / system / op / backend
        found = sorted(
            (p for p in base.glob(f"*/{file}") if p.is_file()),
            key=lambda p: _version_key(p.parent.name),
        )
        if not found:
            raise CalibrationError(
                f"{self.cite}: no {op}/{backend}/*/{file} for system {system} (under {base})"
            )
        return found[-1]

    def source(self, path: Path) -> str:
        """The citation of one file."""
        return f"{self.cite}, {path.relative_to(self.root.parent.parent).as_posix()}"


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def find_data(folder: Path | None = None) -> Data:
    """The installed package's data (or ``folder``: a ``systems/data`` folder of it)."""
    if folder is not None:
        if not folder.is_dir():
            raise CalibrationError(
                f"{folder}: not a folder (expected aiconfigurator's systems/data)"
            )
        return Data(folder, f"AIConfigurator data at {folder}")
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("aiconfigurator_core")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError(
            f"{PACKAGE} is not installed: pip install 'moesim[aiconfigurator]' "
            "(or pass --data with its systems/data folder)"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "systems" / "data"
    version = importlib.metadata.version(PACKAGE)
    return Data(root, f"{PACKAGE} {version} (NVIDIA, Apache-2.0), measured by NVIDIA")


def _bracket(grid: np.ndarray, x: float) -> list[int]:
    """The grid values just below and above ``x`` (one if ``x`` is on the grid or outside)."""
    below, above = grid[grid <= x], grid[grid >= x]
    out = ([int(below.max())] if below.size else []) + ([int(above.min())] if above.size else [])
    return sorted(set(out))


def gemm_tables(
    data: Data, system: str, backend: str, models: list[ModelSpec], tp: int
) -> list[dict[str, Any]]:
    """GEMM tables for the models' shapes, one per dtype the file measures."""
    path = data.latest(system, "gemm", backend, "gemm_perf.parquet")
    df = pd.read_parquet(path, columns=["gemm_dtype", "kernel_source", "m", "n", "k", "latency"])
    tables = []
    for their, (dtype, kernel) in GEMM_DTYPES.items():
        d = df[df.gemm_dtype == their]
        if d.empty:
            continue
        ns, ks = np.sort(d.n.unique()), np.sort(d.k.unique())
        shapes = {s for m in models for s in projection_shapes(m, tp)}
        keep = {(n, k) for sn, sk in shapes
                for n in _bracket(ns, sn) for k in _bracket(ks, sk)}  # fmt: skip
        d = d[[(n, k) in keep for n, k in zip(d.n, d.k, strict=True)]]
        d = d[d.latency > 0].sort_values(["n", "k", "m"])
        kernels = ", ".join(sorted(d.kernel_source.unique()))
        points = [
            GemmTable.point(m, n, k, ms * 1e-3)
            for m, n, k, ms in zip(d.m, d.n, d.k, d.latency, strict=True)
        ]
        tables.append(
            {
                "kernel": f"{kernel} ({kernels})",
                "dtype": dtype,
                "layout": "dense",
                "status": "measured",
                "source": f"{data.source(path)}: gemm_dtype {their}, latency in ms -> "
                f"TFLOPS = 2*m*n*k/latency; the (n, k) grid points bracketing "
                f"the projections of {', '.join(m.name for m in models)} at tp {tp}, every "
                "measured m.",
                "points": points,
            }
        )
    if not tables:
        raise CalibrationError(f"{data.source(path)}: no {' or '.join(GEMM_DTYPES)} GEMMs")
    return tables


def _nearest(values: pd.Series, x: float) -> Any:
    u = np.sort(values.unique())
    return u[np.argmin(np.abs(np.log(u) - np.log(x)))]


def attention_tables(
    data: Data, system: str, backend: str, model: ModelSpec, tp: int
) -> list[dict[str, Any]]:
    """The prefill attention table and the decode attention rates for the model."""
    att = model.attention
    heads = max(att.num_heads // tp, 1)
    mla = att.type == "mla"
    op, pre = (
        ("mla", "context_mla_perf.parquet")
        if mla
        else ("attention", "context_attention_perf.parquet")
    )
    gen = "generation_mla_perf.parquet" if mla else "generation_attention_perf.parquet"
    out: list[dict[str, Any]] = []
    path = data.latest(system, op, backend, pre)
    d = _attention_rows(pd.read_parquet(path), mla, heads, att.num_kv_heads // tp or 1,
                        att.head_dim)  # fmt: skip
    h = int(d.num_heads.iloc[0])
    per_ctx = att.score_flops_per_token(1.0) * h / att.num_heads  # per token and context key
    d = d.sort_values(["isl", "batch_size"]).groupby("isl").tail(1)  # most tokens per length
    tflops = d.batch_size * d.isl * per_ctx * (d.isl / 2) / (d.latency * 1e-3) / 1e12
    out.append(
        {
            "kind": "prefill",
            "kernel": f"{op} ({', '.join(sorted(d.kernel_source.unique()))})",
            "dtype": "bf16",
            "attention": att.type,
            "status": "measured",
            "source": f"{data.source(path)}: bf16, {h} heads per GPU, the largest batch at each "
            "length; TFLOPS with moesim's causal FLOPs (tokens x mean context isl/2).",
            "points": [[int(s), float(f"{t:.5g}")] for s, t in zip(d.isl, tflops, strict=True)],
        }
    )
    path = data.latest(system, op, backend, gen)
    g = _attention_rows(pd.read_parquet(path), mla, heads, att.num_kv_heads // tp or 1,
                        att.head_dim)  # fmt: skip
    h = int(g.num_heads.iloc[0])
    flops_ctx = att.decode_score_flops_per_token(1.0) * h / att.num_heads
    # KV values per cached token read by the measured heads (the latent, for MLA)
    kv = (
        att.kv_elements_per_token()
        if mla
        else 2 * int(g.num_key_value_heads.iloc[0]) * att.head_dim
    )
    seconds = g.latency * 1e-3
    context = g.isl + g.step  # a decode step at `step` reads the prompt and what followed
    gbs = (g.batch_size * context * kv * 2.0 / seconds / 1e9).max()
    tfs = (g.batch_size * context * flops_ctx / seconds / 1e12).max()
    out.append(
        {
            "kind": "decode",
            "kernel": f"{op} generation ({', '.join(sorted(g.kernel_source.unique()))})",
            "dtype": "bf16",
            "attention": att.type,
            "status": "measured",
            "source": f"{data.source(path)}: bf16 KV cache, {h} heads per GPU; the best "
            "achieved KV-cache read rate and FLOP rate over the measured batches and contexts "
            "(isl + step tokens).",
            "gb_per_s": float(f"{gbs:.5g}"),
            "tflops": float(f"{tfs:.5g}"),
        }
    )
    return out


def _attention_rows(
    df: pd.DataFrame, mla: bool, heads: int, kv_heads: int, head_dim: int
) -> pd.DataFrame:
    """The bf16 rows nearest the model's heads per GPU (and head size, for GQA)."""
    dtype_col = "mla_dtype" if mla else "attn_dtype"
    d = df[(df[dtype_col] == "bfloat16") & (df.kv_cache_dtype == "bfloat16") & (df.latency > 0)]
    if "tp_size" in d:
        d = d[d.tp_size == 1]
    if not mla:
        if "window_size" in d:
            d = d[d.window_size == 0]
        d = d[d.head_dim == _nearest(d.head_dim, head_dim)]
        d = d[d.num_key_value_heads == _nearest(d.num_key_value_heads, kv_heads)]
        if "kernel_source" in d and (d.kernel_source == "fa3").any():
            d = d[d.kernel_source == "fa3"]
    if d.empty:
        raise CalibrationError("no bf16 attention rows for this model's heads")
    return d[d.num_heads == _nearest(d.num_heads, heads)]


def deepep_fixed(data: Data, system: str, backend: str, hidden: int) -> tuple[float, str] | None:
    """DeepEP's smallest normal dispatch (its fixed cost), if the package measured it."""
    try:
        path = data.latest(system, "comm", backend, "wideep_deepep_normal_perf.parquet")
    except CalibrationError:
        return None
    d = pd.read_parquet(path)
    d = d[d.hidden_size == _nearest(d.hidden_size, hidden)]
    us = float(d.dispatch_transmit_us.min())
    hidden_size = int(d.hidden_size.iloc[0])
    return us * 1e-6, (
        f"measured: {data.source(path)}: the smallest normal dispatch (hidden {hidden_size}) "
        f"takes {us:.1f} us; taken whole as the fixed cost per call."
    )


class _Dumper(yaml.SafeDumper):
    """Lists of numbers on one line (table points stay readable)."""


def _seq(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.SequenceNode:
    flat = all(isinstance(x, (int, float)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _seq)


def dump(doc: dict[str, Any]) -> str:
    """The profile as YAML, each table point on one line."""
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100)


def imported_profile(
    base: dict[str, Any], data: Data, system: str, backend: str, models: list[ModelSpec],
    tp: int, name: str,
) -> dict[str, Any]:  # fmt: skip
    """``base`` (a profile document) with its kernel tables replaced by the imported ones
    (GEMMs for every model's shapes; attention tables per attention family, from the first
    model of each family)."""
    doc = dict(base)
    doc.pop("calibration", None)
    sources = {k: v for k, v in doc.pop("sources").items() if not k.startswith("kernels.")}
    kernels: dict[str, Any] = {
        "gemm_block": list(base.get("kernels", {}).get("gemm_block", [128, 128]))
    }
    old = base.get("sources", {})
    sources["kernels.gemm_block"] = old.get(
        "kernels.gemm_block",
        "published: DeepGEMM aligns each group's rows to 128 (deepseek-ai/DeepGEMM README).",
    )
    kernels["gemm"] = gemm_tables(data, system, backend, models, tp)
    families: dict[str, ModelSpec] = {}
    for m in models:
        families.setdefault(m.attention.type, m)
    kernels["attention"] = [
        t for m in families.values() for t in attention_tables(data, system, backend, m, tp)
    ]
    collectives = dict(base.get("kernels", {}).get("collectives", {}))
    for key in collectives:
        sources[f"kernels.collectives.{key}"] = old.get(
            f"kernels.collectives.{key}", "assumed: the base profile's figure"
        )
    fixed = deepep_fixed(data, system, backend, max(m.hidden_size for m in models))
    if fixed is not None:
        collectives["deepep_notify_s"] = float(f"{fixed[0]:.4g}")
        sources["kernels.collectives.deepep_notify_s"] = fixed[1]
    if collectives:
        kernels["collectives"] = collectives
    doc["name"] = name
    doc["description"] = (
        f"{base['description']} Kernel tables for {', '.join(m.name for m in models)} "
        f"imported from {data.cite} "
        f"(system {system}, backend {backend})."
    )
    doc["kernels"] = kernels
    doc["sources"] = sources
    return doc
