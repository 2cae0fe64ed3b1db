"""The trace format: lossless round trip, metadata, refusals, clear errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moesim.traces.format import Trace, TraceError, TraceMeta, read_trace, write_trace
from tests.traces.conftest import make_trace


def _full_trace(rng: np.random.Generator):
    experts = np.stack([np.argsort(rng.random((50, 16)), axis=1)[:, :4] for _ in range(3)])
    n = experts.shape[0] * experts.shape[1]
    return make_trace(
        experts,
        16,
        seq_len=10,
        weights=rng.random((n, 4)).astype(np.float32),
        dropped=rng.random((n, 4)) < 0.1,
        logits=rng.standard_normal((n, 16)).astype(np.float32),
    )


def test_round_trip_is_lossless(tmp_path: Path) -> None:
    trace = _full_trace(np.random.default_rng(0))
    trace = replace(trace, meta=replace(trace.meta, capture={"text": ["a.txt"], "seq_len": 10}))
    back = read_trace(write_trace(trace, tmp_path / "t.parquet"))
    assert back.meta == trace.meta
    for name in ("step", "layer", "seq", "pos", "experts", "weights", "dropped", "logits"):
        a, b = getattr(trace, name), getattr(back, name)
        assert a.dtype == b.dtype or name in ("step", "layer", "seq", "pos")
        assert np.array_equal(a, b), name


def test_optional_columns_stay_absent(tmp_path: Path) -> None:
    trace = make_trace(np.zeros((1, 5, 1), dtype=np.int16), 4)
    back = read_trace(trace.write(tmp_path / "t.parquet"))
    assert back.weights is None and back.dropped is None and back.logits is None
    assert back.kept().all()


def test_same_trace_same_bytes(tmp_path: Path) -> None:
    trace = _full_trace(np.random.default_rng(1))
    a = trace.write(tmp_path / "a.parquet").read_bytes()
    assert a == trace.write(tmp_path / "b.parquet").read_bytes()


def test_metadata_is_self_describing(tmp_path: Path) -> None:
    path = _full_trace(np.random.default_rng(0)).write(tmp_path / "t.parquet")
    meta = json.loads(pq.read_schema(path).metadata[b"moesim.trace"])
    assert meta["num_experts"] == 16 and meta["top_k"] == 4 and meta["num_layers"] == 3
    assert meta["format_version"] == 1 and meta["source"] == "test"


def test_never_overwrites(tmp_path: Path) -> None:
    trace = make_trace(np.zeros((1, 5, 1), dtype=np.int16), 4)
    path = trace.write(tmp_path / "t.parquet")
    with pytest.raises(TraceError, match=r"never overwrites"):
        trace.write(path)
    assert not list(tmp_path.glob(".*partial"))


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"no such trace file"):
        read_trace(tmp_path / "missing.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(TraceError, match=r"junk.parquet: not a Parquet file"):
        read_trace(junk)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), plain)
    with pytest.raises(TraceError, match=r"no moesim.trace metadata"):
        read_trace(plain)


def test_inconsistent_traces_are_refused() -> None:
    with pytest.raises(TraceError, match=r"outside 0..3"):
        make_trace(np.full((1, 5, 1), 4), 4)
    trace = make_trace(np.zeros((1, 5, 2), dtype=np.int16), 4)
    with pytest.raises(TraceError, match=r"weights has shape"):
        replace(trace, weights=np.zeros((5, 3), dtype=np.float32))


def test_dense_layout_aligns_layers() -> None:
    experts = np.arange(2 * 6 * 1).reshape(2, 6, 1) % 4
    dense = make_trace(experts, 4, seq_len=3).dense()
    assert dense.experts.shape == (2, 6, 1)
    assert np.array_equal(dense.experts[:, :, 0], experts[:, :, 0])
    assert np.array_equal(dense.keys[:, 1], [0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize(
    "column, values, message",
    [
        ("experts", np.array([[65537, 1]] * 4), "spans"),  # would wrap to 1 in int16
        ("experts", np.array([[1.5, 2.0]] * 4), "whole numbers"),  # would truncate to 1
        ("layer", np.array(["0"] * 4), "whole numbers"),
        ("pos", np.array([-1, 0, 1, 2]), "spans"),
        ("weights", np.array([[np.nan, 1.0]] * 4), "NaN"),
        ("weights", np.array([[np.inf, 1.0]] * 4), "NaN or infinite"),
        ("dropped", np.array([[1, 0]] * 4), "true/false"),
    ],
)
def test_columns_that_would_wrap_truncate_or_be_nan_are_refused(
    column: str, values: np.ndarray, message: str
) -> None:
    meta = TraceMeta("m", 8, 2, 1, "test")
    cols = {
        "step": np.zeros(4, np.int64),
        "layer": np.zeros(4, np.int64),
        "seq": np.zeros(4, np.int64),
        "pos": np.arange(4),
        "experts": np.array([[0, 1]] * 4),
        column: values,
    }
    with pytest.raises(TraceError, match=message):
        Trace(meta=meta, **cols)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"null", "JSON object"),
        (b'"text"', "JSON object"),
        (b'{"format_version": 1, "model": "m", "num_experts": "8", "top_k": 1, '
         b'"num_layers": 1, "source": "s"}', "num_experts"),
        (b'{"format_version": 1, "model": "m", "num_experts": 1000000000, "top_k": 1, '
         b'"num_layers": 1, "source": "s"}', "num_experts"),
        (b'{"format_version": 1, "model": "m", "num_experts": 8, "top_k": 0, '
         b'"num_layers": 1, "source": "s"}', "top_k"),
        (b'{"format_version": 1, "model": null, "num_experts": 8, "top_k": 1, '
         b'"num_layers": 1, "source": "s"}', "model must be text"),
    ],
)  # fmt: skip
def test_bad_metadata_is_a_trace_error(raw: bytes, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        TraceMeta.from_json(raw, "t.parquet")
