"""Serving runs end to end (moesim.serving.run, moesim.serving.requests, the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from moesim.cli import app
from moesim.config.loading import load_scenario
from moesim.errors import ConfigError, ConfigErrors
from moesim.results.writer import summary_json
from moesim.serving.requests import read_trace
from moesim.serving.run import load_requests, simulate_serving
from tests.conftest import SCENARIOS

BASE = SCENARIOS / "mixtral-8x7b-decode-8xh100.yaml"
SERVE = [
    "workload.mode=serve",
    "workload.batch_size=128",
    "serving.requests.rate_per_s=8",
    "serving.requests.count=120",
    "serving.requests.warmup=20",
    "serving.slo_ttft_s=0.5",
    "serving.slo_tpot_s=0.02",
]


def _r(*sets: str):
    return load_scenario(BASE, [*SERVE, *sets])


def test_a_serving_run_is_deterministic_and_counts_its_requests() -> None:
    r = _r()
    a, b = simulate_serving(r), simulate_serving(r)
    assert summary_json(a.summary) == summary_json(b.summary)
    sv = a.summary["serving"]
    assert (sv["requests"], sv["counted"], sv["finished"], sv["unfinished"]) == (120, 100, 100, 0)
    t = a.requests.iloc[20:]
    assert sv["ttft_s"]["p50"] == pytest.approx(np.percentile(t.ttft_s, 50))
    window = t.finish_s.max() - t.arrival_s.min()
    assert sv["output_tokens_per_s"] == pytest.approx(t.output_tokens.sum() / window)
    ok = (t.ttft_s <= 0.5) & ~(t.tpot_s > 0.02)
    assert sv["goodput_requests_per_s"] == pytest.approx(ok.sum() / window)
    other = simulate_serving(_r("seed=1")).summary
    assert other["serving"]["ttft_s"] != sv["ttft_s"]


def test_more_load_means_more_latency() -> None:
    low = simulate_serving(_r("serving.requests.rate_per_s=2")).summary["serving"]
    high = simulate_serving(_r("serving.requests.rate_per_s=40")).summary["serving"]
    assert high["tpot_s"]["p50"] > low["tpot_s"]["p50"]
    assert high["decode_batch_mean"] > low["decode_batch_mean"]


def test_serve_through_the_cli_writes_its_folder(tmp_path: Path) -> None:
    out = CliRunner().invoke(
        app,
        ["run", str(BASE), "--out", str(tmp_path), "--json", *[f"--set={s}" for s in SERVE]],
    )
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    (folder,) = (tmp_path / summary["scenario"]).iterdir()
    requests = pd.read_parquet(folder / "requests.parquet")
    assert len(requests) == 120 and np.isfinite(requests.finish_s).all()
    assert (folder / "report.html").stat().st_size > 10_000


def test_trace_files_are_read(tmp_path: Path) -> None:
    ours = tmp_path / "t.csv"
    ours.write_text("arrival_s,input_tokens,output_tokens\n1.5,100,20\n2.0,50,0\n3.0,70,30\n")
    got = read_trace(ours, 10)
    # the request with no output is skipped; arrivals count from the first
    assert got.arrival_s.tolist() == [0.0, 1.5] and got.prompt.tolist() == [100, 70]
    burst = tmp_path / "b.csv"
    burst.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n7,GPT-4,1087,0,1087,Conversation log\n"
        "9,ChatGPT,80,120,200,API log\n"
    )
    got = read_trace(burst, 10)
    assert got.arrival_s.tolist() == [0.0, 4.0] and got.output.tolist() == [18, 120]
    share = tmp_path / "s.json"
    turns = [{"from": "human", "value": "x" * 400}, {"from": "gpt", "value": "y" * 80}]
    lone = [{"from": "gpt", "value": "hello"}]
    share.write_text(json.dumps([{"conversations": turns}, {"conversations": lone}]))
    got = read_trace(share, 10)
    assert got.prompt.tolist() == [100] and got.output.tolist() == [20]
    assert np.isnan(got.arrival_s).all()  # ShareGPT has no times: drawn as configured
    azure = tmp_path / "az.csv"
    azure.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n2023-11-16 18:16:46.6805900,91,16\n"
    )
    got = read_trace(azure, 10)
    assert got.arrival_s == pytest.approx([0.0, 4.314579, 60.0], abs=1e-6)
    assert got.prompt.tolist() == [374, 396, 91] and got.output.tolist() == [44, 109, 16]
    moon = tmp_path / "m.jsonl"
    moon.write_text(
        '{"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47]}\n'
        "\n"
        '{"timestamp": 3053, "input_length": 6472, "output_length": 26, "hash_ids": [46]}\n'
    )
    got = read_trace(moon, 10)
    assert got.arrival_s.tolist() == [0.0, 3.053] and got.prompt.tolist() == [6955, 6472]
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="expected columns"):
        read_trace(bad, 10)
    bad_time = tmp_path / "t2.csv"
    bad_time.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n")
    with pytest.raises(ConfigError, match="row 2"):
        read_trace(bad_time, 10)
    bad_line = tmp_path / "m2.jsonl"
    bad_line.write_text('{"timestamp": 0, "input_length": 5}\n')
    with pytest.raises(ConfigError, match="line 1: expected a JSON object with timestamp"):
        read_trace(bad_line, 10)


def test_the_shipped_chat_trace_is_made_by_moesim_from_its_cited_figures() -> None:
    from moesim.serving import example

    shipped = SCENARIOS / "traces" / "chat-requests.csv"
    assert shipped.read_text(encoding="utf-8") == example.chat_requests()
    got = read_trace(shipped, 10_000)
    assert got.count == example.COUNT
    # the drawn sample has the cited shape (1,000 draws: within a few standard errors)
    assert np.log(got.prompt).mean() == pytest.approx(example.PROMPT_LOG_MEAN, abs=0.1)
    assert np.log(got.output).std() == pytest.approx(example.OUTPUT_LOG_STD, abs=0.06)
    assert got.count / got.arrival_s[-1] == pytest.approx(example.RATE_PER_S, rel=0.1)


def test_a_trace_drives_the_run(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    rows = "\n".join(f"{i * 0.25},{200 + i},{10 + i % 5}" for i in range(40))
    trace.write_text("arrival_s,input_tokens,output_tokens\n" + rows + "\n")
    sets = [
        "serving.requests.arrival=trace",
        f"serving.requests.trace={trace}",
        "serving.requests.count=40",
        "serving.requests.warmup=0",
    ]
    r = _r(*sets)
    reqs = load_requests(r)
    assert reqs.arrival_s[:3].tolist() == [0.0, 0.25, 0.5] and reqs.prompt[0] == 200
    faster = load_requests(_r(*sets, "serving.requests.speedup=4"))
    assert faster.arrival_s[:3].tolist() == [0.0, 0.0625, 0.125]
    res = simulate_serving(r)
    assert res.summary["serving"]["finished"] == 40
    assert np.allclose(res.requests.arrival_s, reqs.arrival_s)


def test_serving_settings_are_checked() -> None:
    with pytest.raises(ConfigErrors, match="serve and a serving section go together"):
        load_scenario(BASE, ["workload.mode=serve"])
    with pytest.raises(ConfigErrors, match="needs rate_per_s"):
        load_scenario(BASE, [*SERVE, "serving.requests.rate_per_s=null"])
    with pytest.raises(ConfigErrors, match="speedup scales a trace's arrivals"):
        load_scenario(BASE, [*SERVE, "serving.requests.speedup=2"])


def test_serving_runs_compare_with_serving_runs_only(tmp_path: Path) -> None:
    from moesim.errors import MoesimError
    from moesim.runner import simulate
    from moesim.study.compare import compare

    scenario = SCENARIOS / "mixtral-8x7b-offload-serve-1xrtx4090.yaml"
    table, summaries = compare([scenario, scenario], ["policies.offload.policy=lfu"])
    assert list(table["ttft_p50_ms"]) == [
        s["serving"]["ttft_s"]["p50"] * 1e3 for s in summaries.values()
    ]
    assert set(table["placement"]) == {"contiguous"}
    with pytest.raises(MoesimError, match="compare serving runs with serving runs"):
        compare([scenario, SCENARIOS / "quickstart.yaml"])
    with pytest.raises(ConfigError, match="simulate_serving"):
        simulate(load_scenario(scenario))


def test_a_prefill_pool_has_its_own_hardware_and_its_layout_is_checked() -> None:
    from moesim.config.pools import pools
    from moesim.serving.costs import LayerModelCosts

    pd_ = SCENARIOS / "deepseek-v3-serve-pd-13x8xh100.yaml"
    with pytest.raises(ConfigErrors, match=r"serving\.prefill\.parallelism: pp\*dp\*ep\*tp"):
        load_scenario(pd_, ["serving.prefill.parallelism.ep=24"])  # 24 GPUs on 4 nodes of 8
    with pytest.raises(ConfigErrors, match=r"serving\.prefill\.hardware: unknown hardware profile"):
        load_scenario(pd_, ["serving.prefill.hardware=nosuch"])
    h100 = load_scenario(pd_)
    h200 = load_scenario(pd_, ["serving.prefill.hardware=h200"])
    dec, pre = pools(h200)
    assert pre is not None and (dec.hardware.name, pre.hardware.name) == ("h100-sxm", "h200")
    pre_h100 = pools(h100)[1]
    assert pre_h100 is not None
    # the same prompts on H200 (more HBM bandwidth, same tensor cores) take no longer
    fast = LayerModelCosts(pre, 1024).prefill(32 * 2048, 32)
    slow = LayerModelCosts(pre_h100, 1024).prefill(32 * 2048, 32)
    assert fast < slow


def test_a_duration_cuts_the_requests_and_queueing_is_measured() -> None:
    r = _r("serving.requests.duration_s=5", "serving.requests.count=1000")
    reqs = load_requests(r)
    assert reqs.count > 20 and (reqs.arrival_s < 5).all()  # 8 requests/s for 5 s, about 40
    res = simulate_serving(r)
    t = res.requests
    assert (t.queue_s >= 0).all() and (t.queue_s <= t.ttft_s + 1e-12).all()
    assert res.summary["serving"]["queue_s"]["p99"] >= res.summary["serving"]["queue_s"]["p50"]
    with pytest.raises(ConfigErrors, match="duration_s needs poisson or trace arrivals"):
        _r("serving.requests.arrival=concurrency", "serving.requests.clients=4",
           "serving.requests.duration_s=5")  # fmt: skip
    with pytest.raises(ConfigError, match="not more than the 20 of warmup"):
        load_requests(_r("serving.requests.duration_s=0.5"))
