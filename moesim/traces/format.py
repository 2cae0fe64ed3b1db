"""moesim's routing-trace format: one Parquet file, self-describing.

A trace records what a router chose for every routed token of every MoE layer it saw. One row
per (token, layer):

=========  ==============================  ================================================
column     type                            meaning
=========  ==============================  ================================================
step       int32                           training step, or engine/decode step (source
                                           dependent; see ``meta.capture``)
layer      int16                           MoE layer index, 0 .. ``num_layers - 1``
seq        int32                           sequence id, unique within the trace
pos        int32                           position of the token in its sequence
experts    fixed_size_list<int16>[top_k]   chosen experts, in the router's order
weights    fixed_size_list<float32>[top_k] gate weights (optional)
dropped    fixed_size_list<bool>[top_k]    the router dropped that choice (capacity
                                           overflow, e.g. Switch Transformers; optional)
logits     fixed_size_list<float32>[E]     full router logits (optional)
=========  ==============================  ================================================

The schema's metadata key ``moesim.trace`` holds a JSON object (:class:`TraceMeta`): model,
num_experts, top_k, num_layers, source, and the capture settings. Files carry no timestamp, so
the same capture gives the same bytes. :func:`read_trace` turns the fixed-size lists into
``[rows, k]`` numpy arrays without copying per row (tens of millions of assignments per
second; ``make bench`` measures it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moesim import jsonout
from moesim.errors import MoesimError

FORMAT_VERSION = 1
META_KEY = b"moesim.trace"
MAX_EXPERTS = 32_767
"""Most experts per layer: expert ids are int16."""
MAX_TOP_K = 1024
MAX_LAYERS = 10_000
INT_COLUMNS: dict[str, type[np.integer]] = {
    "step": np.int32,
    "layer": np.int16,
    "seq": np.int32,
    "pos": np.int32,
    "experts": np.int16,
}
"""Integer columns and the dtype each is stored in; values must fit it (nothing wraps)."""


class TraceError(MoesimError):
    """A trace file is missing, malformed, or does not fit what it is used for."""

    def __init__(self, path: str | Path | None, message: str | None = None) -> None:
        # one argument: the whole message (how SimPy re-raises from a process, type(e)(*args))
        if message is None:
            super().__init__(str(path))
        else:
            super().__init__(f"{path}: {message}" if path is not None else message)


@dataclass(frozen=True)
class TraceMeta:
    """What a trace is of and how it was made.

    Attributes:
        model: Model name or Hugging Face id the routing came from.
        num_experts: Routed experts per MoE layer.
        top_k: Experts chosen per token.
        num_layers: MoE layers of the model (a trace may hold only some of them).
        source: How the trace was made: ``capture``, ``vllm``, ``megatron``, ``npy``,
            ``synthetic``.
        capture: Free-form settings of the capture or import (text, dtype, dropped rows, ...).
    """

    model: str
    num_experts: int
    top_k: int
    num_layers: int
    source: str
    capture: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("model", "source"):
            if not isinstance(getattr(self, name), str):
                raise TraceError(None, f"metadata {name} must be text, got {getattr(self, name)!r}")
        if not isinstance(self.capture, dict):
            raise TraceError(None, f"metadata capture must be a mapping, got {self.capture!r:.60}")
        limits = {"num_experts": MAX_EXPERTS, "top_k": MAX_TOP_K, "num_layers": MAX_LAYERS}
        for name, most in limits.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most:
                raise TraceError(
                    None, f"metadata {name} must be a whole number in 1..{most}, got {v!r:.60}"
                )
        if self.top_k > self.num_experts:
            raise TraceError(
                None, f"metadata top_k {self.top_k} exceeds num_experts {self.num_experts}"
            )

    def to_json(self) -> str:
        """The metadata as canonical JSON (sorted keys)."""
        return jsonout.dumps(
            {"format_version": FORMAT_VERSION, **asdict(self)}, sort_keys=True, default=str
        )

    @classmethod
    def from_json(cls, text: str | bytes, path: str | Path | None = None) -> TraceMeta:
        """Parse metadata written by :meth:`to_json`."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError(f"expected a JSON object, got {type(raw).__name__}")
            version = raw.pop("format_version", None)
            if version != FORMAT_VERSION:
                raise TraceError(path, f"trace format version {version}, expected {FORMAT_VERSION}")
            return cls(**raw)
        except TraceError as e:
            raise TraceError(path, f"bad moesim.trace metadata: {e}") from None
        except (ValueError, TypeError, RecursionError) as e:
            raise TraceError(path, f"bad moesim.trace metadata: {e}") from None


@dataclass(frozen=True)
class Trace:
    """A routing trace in memory: ``n`` rows, one per (token, layer).

    Attributes:
        meta: What the trace is of.
        step, layer, seq, pos: ``[n]`` int arrays.
        experts: ``[n, top_k]`` int16.
        weights: ``[n, top_k]`` float32 gate weights, or None.
        dropped: ``[n, top_k]`` bool, or None (nothing recorded as dropped).
        logits: ``[n, num_experts]`` float32 router logits, or None.
    """

    meta: TraceMeta
    step: np.ndarray
    layer: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    experts: np.ndarray
    weights: np.ndarray | None = None
    dropped: np.ndarray | None = None
    logits: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._canonical_columns()
        n = len(self.step)
        m = self.meta
        for name in ("layer", "seq", "pos"):
            if len(getattr(self, name)) != n:
                raise TraceError(
                    None, f"column {name} has {len(getattr(self, name))} rows, not {n}"
                )
        if self.experts.shape != (n, m.top_k):
            raise TraceError(
                None, f"experts has shape {self.experts.shape}, expected ({n}, {m.top_k})"
            )
        for name, width in (("weights", m.top_k), ("dropped", m.top_k), ("logits", m.num_experts)):
            arr = getattr(self, name)
            if arr is not None and arr.shape != (n, width):
                raise TraceError(None, f"{name} has shape {arr.shape}, expected ({n}, {width})")
        if n and (self.experts.min() < 0 or self.experts.max() >= m.num_experts):
            raise TraceError(
                None,
                f"expert ids span {self.experts.min()}..{self.experts.max()}, "
                f"outside 0..{m.num_experts - 1}",
            )
        if n and (self.layer.min() < 0 or self.layer.max() >= m.num_layers):
            raise TraceError(
                None,
                f"layer ids span {self.layer.min()}..{self.layer.max()}, "
                f"outside 0..{m.num_layers - 1}",
            )

    def _canonical_columns(self) -> None:
        """Check every column's kind and range, then store it in the format's dtype.

        Ids must be whole numbers that fit the format's integer widths (nothing wraps or is
        truncated); weights and logits must be finite numbers; dropped must be boolean.
        """
        for name, dtype in INT_COLUMNS.items():
            arr = np.asarray(getattr(self, name))
            if arr.size and arr.dtype.kind not in "iu":
                raise TraceError(None, f"column {name} must hold whole numbers, got {arr.dtype}")
            most = int(np.iinfo(np.dtype(dtype)).max)
            if arr.size and (arr.min() < 0 or arr.max() > most):
                raise TraceError(
                    None, f"column {name} spans {arr.min()}..{arr.max()}, outside 0..{most}"
                )
            object.__setattr__(self, name, arr.astype(dtype, copy=False))
        for name in ("weights", "logits"):
            arr = getattr(self, name)
            if arr is None:
                continue
            arr = np.asarray(arr)
            if arr.size and arr.dtype.kind not in "iuf":
                raise TraceError(None, f"column {name} must hold numbers, got {arr.dtype}")
            big = np.finfo(np.float32).max
            if arr.size and not (np.isfinite(arr).all() and np.abs(arr).max() <= big):
                raise TraceError(
                    None, f"column {name} holds NaN or infinite values (or beyond float32)"
                )
            arr = arr.astype(np.float32, copy=False)
            object.__setattr__(self, name, arr)
        if self.dropped is not None:
            arr = np.asarray(self.dropped)
            if arr.size and arr.dtype.kind != "b":
                raise TraceError(None, f"column dropped must be true/false, got {arr.dtype}")
            object.__setattr__(self, "dropped", arr.astype(bool, copy=False))

    @property
    def rows(self) -> int:
        """Rows, one per (token, layer)."""
        return len(self.step)

    @property
    def assignments(self) -> int:
        """Token-expert assignments (rows x top_k)."""
        return self.rows * self.meta.top_k

    def layers(self) -> np.ndarray:
        """The MoE layers present, sorted."""
        return np.unique(self.layer)

    def select(self, mask: np.ndarray) -> Trace:
        """The rows where ``mask`` is True."""
        opt: dict[str, Any] = {
            name: None if getattr(self, name) is None else getattr(self, name)[mask]
            for name in ("weights", "dropped", "logits")
        }
        return replace(
            self,
            step=self.step[mask],
            layer=self.layer[mask],
            seq=self.seq[mask],
            pos=self.pos[mask],
            experts=self.experts[mask],
            **opt,
        )

    @classmethod
    def from_layers(
        cls,
        meta: TraceMeta,
        experts: np.ndarray,
        layer_ids: np.ndarray | None = None,
        seq_len: int | None = None,
        first_seq: int = 0,
        **optional: np.ndarray | None,
    ) -> Trace:
        """A one-step trace from ``experts[layers, tokens, k]``, layer-major rows.

        Token ``t`` is sequence ``first_seq + t // seq_len`` at position ``t % seq_len`` (one
        sequence when ``seq_len`` is None); ``layer_ids`` default to ``0 .. layers - 1``;
        ``optional`` holds weights / dropped / logits already in row order.
        """
        layers, tokens, k = experts.shape
        ids = np.arange(layers) if layer_ids is None else np.asarray(layer_ids)
        length = seq_len or tokens
        t = np.arange(tokens)
        return cls(
            meta=meta,
            step=np.zeros(layers * tokens, dtype=np.int32),
            layer=np.repeat(ids, tokens),
            seq=np.tile(first_seq + t // length, layers),
            pos=np.tile(t % length, layers),
            experts=experts.reshape(-1, k),
            **optional,
        )

    def write(self, path: str | Path) -> Path:
        """Write the trace to ``path`` (see :func:`write_trace`)."""
        return write_trace(self, path)

    def dense(self) -> DenseRouting:
        """The routing as ``[layers present, tokens, top_k]`` arrays (see :class:`DenseRouting`)."""
        keys, token = np.unique(
            np.stack([self.step, self.seq, self.pos], axis=1), axis=0, return_inverse=True
        )
        token = token.reshape(-1)
        layers = self.layers()
        slot = np.searchsorted(layers, self.layer)
        experts = np.full((len(layers), len(keys), self.meta.top_k), -1, dtype=np.int16)
        experts[slot, token] = self.experts
        weights = None
        if self.weights is not None:
            weights = np.zeros(experts.shape, dtype=np.float32)
            weights[slot, token] = self.weights
        logits = None
        if self.logits is not None:
            logits = np.zeros((len(layers), len(keys), self.meta.num_experts), dtype=np.float32)
            logits[slot, token] = self.logits
        return DenseRouting(
            layers=layers, keys=keys, experts=experts, weights=weights, logits=logits
        )

    def kept(self) -> np.ndarray:
        """``[n, top_k]`` bool: the choice reached its expert (not dropped)."""
        if self.dropped is None:
            return np.ones(self.experts.shape, dtype=bool)
        return ~self.dropped


@dataclass(frozen=True)
class DenseRouting:
    """A trace laid out per token, sorted by (step, seq, pos).

    Attributes:
        layers: ``[L]`` the MoE layers present.
        keys: ``[T, 3]`` (step, seq, pos) of each token.
        experts: ``[L, T, top_k]`` int16, -1 where a token was not recorded at a layer.
        weights: ``[L, T, top_k]`` float32 gate weights (0 where missing), or None.
        logits: ``[L, T, E]`` float32 router logits (0 where missing), or None.
    """

    layers: np.ndarray
    keys: np.ndarray
    experts: np.ndarray
    weights: np.ndarray | None
    logits: np.ndarray | None = None


def _fixed_list(values: np.ndarray, pa_type: Any) -> Any:
    import pyarrow as pa

    flat = pa.array(np.ascontiguousarray(values).ravel(), type=pa_type)
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Write ``trace`` to ``path`` (Parquet, zstd); refuses to overwrite an existing file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    refuse_existing(path)
    cols: dict[str, Any] = {
        "step": pa.array(trace.step.astype(np.int32)),
        "layer": pa.array(trace.layer.astype(np.int16)),
        "seq": pa.array(trace.seq.astype(np.int32)),
        "pos": pa.array(trace.pos.astype(np.int32)),
        "experts": _fixed_list(trace.experts.astype(np.int16), pa.int16()),
    }
    if trace.weights is not None:
        cols["weights"] = _fixed_list(trace.weights.astype(np.float32), pa.float32())
    if trace.dropped is not None:
        cols["dropped"] = _fixed_list(trace.dropped.astype(bool), pa.bool_())
    if trace.logits is not None:
        cols["logits"] = _fixed_list(trace.logits.astype(np.float32), pa.float32())
    table = pa.table(cols).replace_schema_metadata({META_KEY: trace.meta.to_json().encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=1 << 20)
        tmp.rename(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _column(table: Any, name: str, width: int | None) -> np.ndarray:
    """One column as numpy in its stored dtype (:class:`Trace` checks and converts it)."""
    import pyarrow as pa

    col = table.column(name).combine_chunks()
    if width is None:
        if pa.types.is_nested(col.type):
            raise TraceError(None, f"column {name} must hold one value per row, got {col.type}")
        return col.to_numpy(zero_copy_only=False)
    if not (pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise TraceError(None, f"column {name} must hold a list per row, got {col.type}")
    if col.null_count or col.values.null_count:
        raise TraceError(None, f"column {name} has missing values")
    lengths = np.diff(col.offsets.to_numpy()) if pa.types.is_list(col.type) else None
    if lengths is not None and lengths.size and (lengths != width).any():
        raise TraceError(None, f"column {name} has lists of length other than {width}")
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def refuse_existing(path: Path, what: str = "a trace", option: str = "--out") -> None:
    """Raise if ``path`` exists: moesim never overwrites an earlier result."""
    if path.exists():
        raise TraceError(path, f"exists; moesim never overwrites {what} (choose another {option})")


def _meta_of(schema: Any, path: str | Path) -> TraceMeta:
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise TraceError(path, "no moesim.trace metadata; write traces with moesim trace ...")
    return TraceMeta.from_json(raw, path)


def read_meta(path: str | Path) -> TraceMeta:
    """The metadata of a trace file, without reading its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise TraceError(path, f"not a Parquet file: {e}") from None
    return _meta_of(schema, path)


def read_trace(path: str | Path) -> Trace:
    """Load a trace written by :func:`write_trace` (or any Parquet file in its format)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise TraceError(path, "no such trace file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise TraceError(path, f"not a Parquet file: {e}") from None
    meta = _meta_of(table.schema, path)
    missing = {"step", "layer", "seq", "pos", "experts"} - set(table.column_names)
    if missing:
        raise TraceError(path, f"missing columns: {', '.join(sorted(missing))}")
    names = set(table.column_names)
    try:
        return Trace(
            meta=meta,
            step=_column(table, "step", None),
            layer=_column(table, "layer", None),
            seq=_column(table, "seq", None),
            pos=_column(table, "pos", None),
            experts=_column(table, "experts", meta.top_k),
            weights=_column(table, "weights", meta.top_k) if "weights" in names else None,
            dropped=_column(table, "dropped", meta.top_k) if "dropped" in names else None,
            logits=_column(table, "logits", meta.num_experts) if "logits" in names else None,
        )
    except TraceError as e:
        raise TraceError(path, str(e)) from None
    except (ValueError, TypeError, pa.ArrowException) as e:
        raise TraceError(path, f"malformed columns: {e}") from None


def concat_traces(traces: list[Trace]) -> Trace:
    """Rows of several traces of the same model, in order (metadata of the first)."""
    first = traces[0]

    def cat(name: str) -> np.ndarray | None:
        parts = [getattr(t, name) for t in traces]
        if any(p is None for p in parts):
            return None
        return np.concatenate(parts)

    return Trace(
        meta=first.meta,
        step=np.concatenate([t.step for t in traces]),
        layer=np.concatenate([t.layer for t in traces]),
        seq=np.concatenate([t.seq for t in traces]),
        pos=np.concatenate([t.pos for t in traces]),
        experts=np.concatenate([t.experts for t in traces]),
        weights=cat("weights"),
        dropped=cat("dropped"),
        logits=cat("logits"),
    )
