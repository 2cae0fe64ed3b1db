"""Import routing logs from other tools into moesim's trace format.

- ``vllm``: the per-layer expert-log JSON lines of vLLM-MoE-Logger (one ``{"type": "meta"}``
  header, then ``{"type": "route", "token_idx", "layer", "topk_ids", "topk_weights"}`` rows).
  ``token_idx`` restarts at every engine step, which is how steps are found. vLLM's start-up
  profiling run and warm-up steps route dummy input: every token of such a step takes the same
  experts. Leading steps where that holds in most layer files are dropped and reported.
  The log does not identify requests, so each engine step is one trace sequence and ``pos`` is
  the row in the step. Several per-layer files (whose rows line up) combine into one trace.
- ``megatron``: Megatron-Core's router trace (``router_trace_rank{r}.jsonl``, written by
  ``megatron/core/transformer/moe/router_trace.py``): one record per (step, block, layer, rank)
  with ``top_indices`` ``[num_tokens, topk]``; tokens are in Megatron's ``[seq, batch]`` order,
  so with ``micro_batch`` b token t is sequence ``t % b`` at position ``t // b``. MTP records
  are skipped.
- ``npy``: a numpy ``[tokens, layers]`` array of top-1 expert ids (sequences of ``seq_len``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim.registry import Registry
from moesim.traces.format import Trace, TraceError, TraceMeta


@dataclass
class ImportReport:
    """What an import did: the trace, and lines for the user (dropped rows and why)."""

    trace: Trace
    notes: list[str] = field(default_factory=list)


Importer = Callable[..., ImportReport]
IMPORTERS: Registry[Importer] = Registry("trace importer")


def _files(src: Path, pattern: str) -> list[Path]:
    if src.is_dir():
        files = sorted(src.glob(pattern))
        if not files:
            raise TraceError(src, f"no {pattern} files in this directory")
        return files
    if not src.is_file():
        raise TraceError(src, "no such file or directory")
    return [src]


def _model_shape(
    model_id: str | None, num_experts: int | None, num_layers: int | None
) -> tuple[int | None, int | None]:
    """Experts and MoE layers from the arguments, else from a bundled preset matching the id."""
    if (num_experts is None or num_layers is None) and model_id:
        from moesim.models.presets import load_preset, preset_names

        base = model_id.split("/")[-1].lower()
        for suffix in ("-chat", "-instruct", "-base"):
            base = base.removesuffix(suffix)
        for name in preset_names():
            spec = load_preset(name)
            if name == base or spec.name == base:
                num_experts = num_experts or spec.moe.num_experts
                num_layers = num_layers or len(spec.moe_layers)
                break
    return num_experts, num_layers


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, one per non-empty line.

    Raises:
        TraceError: a line that is not UTF-8, not JSON, or not a JSON object.
    """
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    raise TraceError(path, f"line {lineno}: not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise TraceError(
                        path, f"line {lineno}: expected a JSON object, got {type(row).__name__}"
                    )
                rows.append(row)
    except UnicodeDecodeError as e:
        raise TraceError(path, f"not UTF-8 text (byte {e.start} of a line)") from None
    except OSError as e:
        raise TraceError(path, f"cannot read: {e.strerror or e}") from None
    return rows


def _ints(values: Any, path: Path, what: str, ndim: int) -> np.ndarray:
    """``values`` as an int64 array of ``ndim`` dimensions, refusing text, fractions and
    ragged rows (``np.array(..., dtype=int)`` would truncate 1.5 to 1)."""
    try:
        arr = np.asarray(values)
    except ValueError as e:
        raise TraceError(path, f"{what}: ragged or mixed rows ({e})") from None
    if arr.ndim != ndim or (arr.size and arr.dtype.kind not in "iu"):
        raise TraceError(
            path, f"{what} must be {ndim}-D whole numbers, got {arr.dtype} of shape {arr.shape}"
        )
    return arr.astype(np.int64)


def _steps_of(token_idx: np.ndarray) -> np.ndarray:
    """Engine step of each row: a new step starts where ``token_idx`` does not increase."""
    starts = np.r_[True, token_idx[1:] <= token_idx[:-1]]
    return np.cumsum(starts) - 1


def _uniform_steps(experts: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """``[n_steps]`` bool: every row of the step (more than one) has the same expert set."""
    key = np.sort(experts, axis=1)
    n_steps = int(steps[-1]) + 1
    same = np.r_[False, np.all(key[1:] == key[:-1], axis=1) & (steps[1:] == steps[:-1])]
    rows = np.bincount(steps, minlength=n_steps)
    same_rows = np.bincount(steps, weights=same, minlength=n_steps)
    return (rows > 1) & (same_rows == rows - 1)


@IMPORTERS.register("vllm")
def import_vllm(
    src: Path,
    num_experts: int | None = None,
    num_layers: int | None = None,
    **_: Any,
) -> ImportReport:
    """Import vLLM-MoE-Logger per-layer JSONL files (a file, or a directory of them)."""
    files = _files(src, "*.jsonl")
    per_file = []
    meta_hdr: dict[str, Any] = {}
    for path in files:
        rows = _read_jsonl(path)
        hdr = [r for r in rows if r.get("type") == "meta"]
        routes = [r for r in rows if r.get("type") == "route"]
        if not routes:
            raise TraceError(path, "no route rows")
        meta_hdr = meta_hdr or (hdr[0] if hdr else {})
        try:
            layer = _ints([r["layer"] for r in routes], path, "layer", 1)
            tok = _ints([r["token_idx"] for r in routes], path, "token_idx", 1)
            experts = _ints([r["topk_ids"] for r in routes], path, "topk_ids", 2)
            weights = np.array([r["topk_weights"] for r in routes], dtype=np.float64)
        except (KeyError, ValueError, TypeError) as e:
            raise TraceError(
                path, f"route rows need layer, token_idx, topk_ids, topk_weights: {e}"
            ) from None
        if weights.shape != experts.shape:
            raise TraceError(path, "topk_weights and topk_ids differ in shape")
        if len(np.unique(layer)) != 1:
            raise TraceError(path, "one layer per file expected")
        per_file.append((path, int(layer[0]), tok, experts, weights))
    per_file.sort(key=lambda f: f[1])
    lengths = {len(f[2]) for f in per_file}
    if len(lengths) != 1 or any(not np.array_equal(f[2], per_file[0][2]) for f in per_file):
        raise TraceError(src, "the per-layer files do not line up (different token_idx rows)")
    steps = _steps_of(per_file[0][2])
    uniform = np.mean([_uniform_steps(f[3], steps) for f in per_file], axis=0) > 0.5
    lead = int(np.argmin(uniform)) if not uniform.all() else len(uniform)
    drop = steps < lead
    notes = [
        f"dropped {int(drop.sum())} rows per layer file: {lead} leading engine step(s) "
        f"({', '.join(str(int(n)) for n in np.bincount(steps)[:lead])} tokens) where every "
        "token took the same experts (vLLM start-up profiling / warm-up on dummy input)"
    ]
    keep = ~drop
    model_id = str(meta_hdr.get("model_id", "unknown"))
    n_exp, n_lay = _model_shape(model_id, num_experts, num_layers)
    all_experts = np.concatenate([f[3][keep] for f in per_file])
    n_exp = n_exp or int(all_experts.max()) + 1
    n_lay = n_lay or max(f[1] for f in per_file) + 1
    step = steps[keep] - lead
    n = int(keep.sum())
    trace = Trace(
        meta=TraceMeta(
            model=model_id,
            num_experts=n_exp,
            top_k=all_experts.shape[1],
            num_layers=n_lay,
            source="vllm",
            capture={
                "files": [p.name for p, *_ in per_file],
                "vllm_version": meta_hdr.get("vllm_version"),
                "device": meta_hdr.get("device"),
                "dropped_warmup_rows_per_layer": int(drop.sum()),
                "sequences": "one per engine step (requests are not identified in the log)",
            },
        ),
        step=np.tile(step, len(per_file)),
        layer=np.repeat([f[1] for f in per_file], n),
        seq=np.tile(step, len(per_file)),
        pos=np.tile(per_file[0][2][keep], len(per_file)),
        experts=all_experts,
        weights=np.concatenate([f[4][keep] for f in per_file]),
    )
    notes.append(
        f"{n} tokens x {len(per_file)} layers ({', '.join(str(f[1]) for f in per_file)}), "
        f"{int(step.max()) + 1 if n else 0} engine steps"
    )
    return ImportReport(trace=trace, notes=notes)


@IMPORTERS.register("megatron")
def import_megatron(
    src: Path,
    num_experts: int | None = None,
    num_layers: int | None = None,
    micro_batch: int = 1,
    model: str = "megatron",
    **_: Any,
) -> ImportReport:
    """Import Megatron-Core router-trace JSONL files (a file, or a directory of rank files)."""
    files = _files(src, "router_trace_rank*.jsonl")
    records = []
    skipped = 0
    for path in files:
        for rec in _read_jsonl(path):
            if rec.get("block", "decoder") != "decoder" or "mtp_idx" in rec:
                skipped += 1
                continue
            for key in ("step", "layer", "top_indices"):
                if key not in rec:
                    raise TraceError(path, f"record without '{key}': {sorted(rec)[:10]}")
            for key in ("step", "layer", "rank"):
                v = rec.get(key, 0)
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
                    raise TraceError(path, f"record {key} must be a whole number, got {v!r:.40}")
            records.append(rec)
    if not records:
        raise TraceError(src, "no decoder router records")
    layer_ids = sorted({int(r["layer"]) for r in records})
    layer_of = {lid: i for i, lid in enumerate(layer_ids)}
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("step", "layer", "seq", "pos", "experts")}
    seq_base: dict[tuple[int, int], int] = {}
    for rec in sorted(records, key=lambda r: (r["step"], r.get("rank", 0), r["layer"])):
        where = f"step {rec['step']} layer {rec['layer']}: top_indices"
        idx = _ints(rec["top_indices"], src, where, 2)
        t = np.arange(len(idx))
        sr = (int(rec["step"]), int(rec.get("rank", 0)))
        base = seq_base.setdefault(sr, micro_batch * len(seq_base))
        parts["step"].append(np.full(len(idx), rec["step"]))
        parts["layer"].append(np.full(len(idx), layer_of[int(rec["layer"])]))
        parts["seq"].append(base + t % micro_batch)
        parts["pos"].append(t // micro_batch)
        parts["experts"].append(idx)
    if len({p.shape[1] for p in parts["experts"]}) > 1:
        raise TraceError(src, "records choose different numbers of experts (top-k)")
    experts = np.concatenate(parts["experts"])
    if not experts.size:
        raise TraceError(src, "the records hold no tokens")
    n_exp, n_lay = _model_shape(model, num_experts, num_layers)
    trace = Trace(
        meta=TraceMeta(
            model=model,
            num_experts=n_exp or int(experts.max()) + 1,
            top_k=experts.shape[1],
            num_layers=n_lay or len(layer_ids),
            source="megatron",
            capture={
                "files": [p.name for p in files],
                "megatron_layer_ids": layer_ids,
                "micro_batch": micro_batch,
                "num_experts_from": "argument" if num_experts else "max id + 1",
            },
        ),
        step=np.concatenate(parts["step"]),
        layer=np.concatenate(parts["layer"]),
        seq=np.concatenate(parts["seq"]),
        pos=np.concatenate(parts["pos"]),
        experts=experts,
    )
    notes = [f"{len(records)} records, {len(layer_ids)} layers, {len(seq_base)} (step, rank) pairs"]
    if skipped:
        notes.append(f"skipped {skipped} MTP / non-decoder records")
    if not num_experts:
        notes.append(
            f"num_experts = {trace.meta.num_experts} from the largest expert id seen; "
            "pass --num-experts if some experts were never chosen"
        )
    return ImportReport(trace=trace, notes=notes)


@IMPORTERS.register("npy")
def import_npy(
    src: Path,
    num_experts: int | None = None,
    seq_len: int | None = None,
    model: str = "unknown",
    **_: Any,
) -> ImportReport:
    """Import a numpy ``[tokens, layers]`` array of top-1 expert ids."""
    if not src.is_file():
        raise TraceError(src, "no such file")
    try:
        arr = np.load(src, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise TraceError(src, f"not a .npy array: {e}") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or not arr.size:
        raise TraceError(
            src, f"expected a non-empty integer [tokens, layers] array, got {arr.dtype} {arr.shape}"
        )
    tokens, layers = arr.shape
    length = seq_len or tokens
    meta = TraceMeta(
        model=model,
        num_experts=num_experts or int(arr.max()) + 1,
        top_k=1,
        num_layers=layers,
        source="npy",
        capture={"file": src.name, "seq_len": length},
    )
    trace = Trace.from_layers(meta, arr.T[:, :, None], seq_len=length)
    return ImportReport(trace=trace, notes=[f"{tokens} tokens x {layers} layers, top-1"])
