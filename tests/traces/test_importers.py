"""Importers: vLLM logs (real data), Megatron router traces, numpy arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moesim.traces.format import TraceError
from moesim.traces.importers import import_megatron, import_npy, import_vllm
from moesim.traces.stats import trace_stats
from tests.traces.conftest import VLLM, needs


@needs(VLLM)
def test_vllm_log_of_qwen_drops_warmup_and_combines_layers() -> None:
    report = import_vllm(VLLM)
    trace = report.trace
    assert "dropped 8448 rows" in report.notes[0]  # the data README: real traffic at row 8448
    assert trace.meta.num_experts == 60 and trace.meta.top_k == 4  # from the qwen1.5 preset
    assert trace.meta.num_layers == 24
    assert list(trace.layers()) == [0, 8, 12, 18, 23]
    rows = [json.loads(line) for line in (VLLM / "moe_layer8.jsonl").open()][1:]
    first_real = rows[8448]
    layer8 = trace.select(trace.layer == 8)
    assert list(layer8.experts[0]) == first_real["topk_ids"]
    assert layer8.weights[0] == pytest.approx(first_real["topk_weights"])
    assert layer8.rows == len(rows) - 8448
    stats = trace_stats(trace)
    assert stats["trace"]["steps"] == 129  # engine steps after warm-up
    for row in stats["layers"]:  # a trained router on real text: skewed but every expert used
        assert 1.2 < row["max_over_mean"] < 2.5 and row["experts_used"] == 60


def _megatron_records(steps: int, layers: list[int], tokens: int, k: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for step in range(steps):
        for layer in layers:
            idx = np.argsort(rng.random((tokens, 16)), axis=1)[:, :k]
            out.append(
                {
                    "step": step,
                    "stage": "pre_dispatch",
                    "block": "decoder",
                    "layer": layer,
                    "rank": 0,
                    "num_tokens": tokens,
                    "topk": k,
                    "top_indices": idx.tolist(),
                }
            )
    out.append(
        {
            "step": 0,
            "block": "mtp",
            "mtp_idx": 0,
            "layer": 1,
            "rank": 0,
            "num_tokens": 1,
            "topk": k,
            "top_indices": [[0] * k],
        }
    )
    return out


def test_megatron_router_trace(tmp_path: Path) -> None:
    recs = _megatron_records(steps=2, layers=[1, 2, 3], tokens=8, k=2)
    path = tmp_path / "router_trace_rank0.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    report = import_megatron(tmp_path, num_experts=16, micro_batch=2)
    trace = report.trace
    assert any("skipped 1 MTP" in n for n in report.notes)
    assert trace.meta.num_layers == 3 and list(trace.layers()) == [0, 1, 2]
    assert trace.meta.capture["megatron_layer_ids"] == [1, 2, 3]
    # [seq, batch] order: token t of a record is sequence t % 2 at position t // 2
    rec = recs[0]
    first = trace.select((trace.step == 0) & (trace.layer == 0))
    assert list(first.seq) == [0, 1] * 4 and list(first.pos) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert np.array_equal(first.experts, np.array(rec["top_indices"]))
    second = trace.select((trace.step == 1) & (trace.layer == 0))
    assert set(second.seq) == {2, 3}  # new sequences in the next step


def test_megatron_errors_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "router_trace_rank0.jsonl").write_text('{"step": 0, "layer": 1}\n')
    with pytest.raises(TraceError, match=r"without 'top_indices'"):
        import_megatron(tmp_path)
    with pytest.raises(TraceError, match=r"missing: no such file or directory"):
        import_megatron(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TraceError, match=r"no router_trace_rank\*.jsonl files"):
        import_megatron(tmp_path / "empty")


def test_npy_top1(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).integers(0, 8, size=(40, 3))
    np.save(tmp_path / "a.npy", arr)
    trace = import_npy(tmp_path / "a.npy", seq_len=10).trace
    assert trace.meta.top_k == 1 and trace.meta.num_layers == 3
    assert np.array_equal(trace.dense().experts[:, :, 0], arr.T)
    assert trace.seq.max() == 3 and trace.pos.max() == 9
    np.save(tmp_path / "b.npy", np.zeros(5))
    with pytest.raises(TraceError, match=r"integer \[tokens, layers\]"):
        import_npy(tmp_path / "b.npy")
