"""A serving run: requests through the instances, steps priced by the layer model, latency
and throughput metrics.

The scenario's own cluster, parallelism and policies describe the decode instances (``dp``
of them, one EP group each, DP attention inside); with ``serving.prefill`` a separate pool of
prefill instances takes the prompts and hands each finished prompt's KV cache to a decode
instance over the network (the transfers leaving one DP-attention rank share its NIC, then
pay the fabric's latency: :class:`moesim.serving.scheduler.KVLink`). Without it, the decode
instances prefill too (co-located serving).

Metrics (``summary.json``'s ``serving`` block), over the requests after ``warmup``:
TTFT (arrival to first token), TPOT (first to last token over the tokens after the first),
end-to-end latency and queueing (arrival to the start of the first step that works on the
request's prompt), each as mean and p50 / p90 / p99; throughput of input and output tokens
over the window from the first counted arrival to the last counted finish, in all, per node
and per GPU; goodput (requests per second meeting both SLOs); requests unfinished; KV cache
use and batch size over the steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moesim.config.loading import ResolvedScenario
from moesim.config.pools import pools
from moesim.errors import ConfigError
from moesim.serving import requests as req
from moesim.serving.costs import LayerModelCosts, kv_bytes_per_token, kv_tokens
from moesim.serving.scheduler import InstanceSpec, KVLink, Trace, serve

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class ServingResult:
    """A serving run's results.

    Attributes:
        resolved: The scenario.
        summary: ``summary.json``.
        requests: One row per request: arrival, first token, finish (seconds), prompt and
            output tokens, preemptions, and TTFT, TPOT, end-to-end latency.
        steps: One row per engine step: instance, kind, start, end, tokens, batch, requests
            decoding, KV tokens in use.
    """

    resolved: ResolvedScenario
    summary: dict[str, Any]
    requests: pd.DataFrame
    steps: pd.DataFrame


def load_requests(r: ResolvedScenario) -> req.Requests:
    """The run's requests: from the trace, or drawn; arrivals drawn when the trace has none
    (seeded by the scenario's seed)."""
    s = r.scenario
    assert s.serving is not None
    cfg = s.serving.requests
    rng = np.random.default_rng(np.random.SeedSequence([s.seed, 7]))
    if cfg.trace is not None:
        path = Path(cfg.trace)
        if not path.is_absolute() and r.path is not None:
            path = r.path.parent / path
        got = req.read_trace(path, cfg.count)
        prompt, output = got.prompt, got.output
        arrival = got.arrival_s / cfg.speedup
    else:
        i, o = cfg.input_len, cfg.output_len
        prompt = req.lengths(i.dist, i.mean, i.min, i.max, i.sigma, cfg.count, rng)
        output = req.lengths(o.dist, o.mean, o.min, o.max, o.sigma, cfg.count, rng)
        arrival = np.full(cfg.count, np.nan)
    if cfg.arrival == "poisson" or (cfg.arrival == "trace" and np.isnan(arrival).any()):
        rate = cfg.rate_per_s or 1.0
        arrival = req.poisson_arrivals(rate, prompt.size, rng)
    elif cfg.arrival == "concurrency":
        arrival = np.zeros(prompt.size)
    if cfg.duration_s is not None:
        keep = arrival < cfg.duration_s
        if keep.sum() <= cfg.warmup:
            raise ConfigError(
                r.path,
                "serving.requests.duration_s",
                f"{int(keep.sum())} requests arrive in the first {cfg.duration_s:g} s, not "
                f"more than the {cfg.warmup} of warmup",
            )
        arrival, prompt, output = arrival[keep], prompt[keep], output[keep]
    return req.Requests(arrival, prompt, output)


def simulate_serving(r: ResolvedScenario) -> ServingResult:
    """Serve the scenario's requests and measure them (see the module docstring)."""
    s = r.scenario
    sv = s.serving
    assert sv is not None
    dec_r, pre_r = pools(r)
    max_running = s.workload.batch_size
    dec_costs = LayerModelCosts(dec_r, max_running)
    dec_spec = InstanceSpec(
        max_running=max_running,
        max_prefill_tokens=sv.max_prefill_tokens,
        kv_tokens=kv_tokens(dec_r),
        kv_block_tokens=sv.kv_block_tokens,
    )
    decode = [dec_spec] * s.parallelism.dp
    prefill: list[InstanceSpec] = []
    pre_costs = dec_costs
    link = None
    if pre_r is not None:
        assert sv.prefill is not None
        pre_costs = LayerModelCosts(pre_r, max_running)
        kv = kv_tokens(pre_r)
        spec = InstanceSpec(
            max_running=1 << 30,
            max_prefill_tokens=sv.max_prefill_tokens,
            kv_tokens=kv,
            kv_block_tokens=sv.kv_block_tokens,
        )
        prefill = [spec] * sv.prefill.parallelism.dp
        node = pre_r.hardware.node  # the KV caches leave the prefill ranks' NICs
        link = KVLink(
            bytes_per_token=kv_bytes_per_token(r),
            nic_bytes_per_s=node.nic_gb_per_s * 1e9 * node.nic_efficiency,
            latency_s=pre_r.hardware.fabric.latency_s,
            ranks=sv.prefill.parallelism.ep,
        )

    reqs = load_requests(r)
    clients = sv.requests.clients if sv.requests.arrival == "concurrency" else None
    trace = serve(
        reqs.arrival_s,
        reqs.prompt,
        reqs.output,
        prefill,
        decode,
        pre_costs,
        dec_costs,
        sv.tokens_per_step,
        link,
        clients,
        mixed=sv.batching == "mixed",
    )
    table = request_table(trace)
    steps = pd.DataFrame(
        trace.steps,
        columns=[
            "instance",
            "kind",
            "start_s",
            "end_s",
            "tokens",
            "batch",
            "decoding",
            "kv_tokens",
        ],
    )
    summary = serving_summary(r, table, steps, dec_spec.kv_tokens)
    summary["serving"]["steps_simulated"] = dec_costs.simulated + (
        pre_costs.simulated if pre_costs is not dec_costs else 0
    )
    return ServingResult(r, summary, table, steps)


def request_table(trace: Trace) -> pd.DataFrame:
    """One row per request with its latencies."""
    ttft = trace.first_token - trace.arrival
    decode_tokens = np.maximum(trace.output - 1, 1)
    tpot = np.where(trace.output > 1, (trace.finish - trace.first_token) / decode_tokens, np.nan)
    return pd.DataFrame(
        {
            "arrival_s": trace.arrival,
            "scheduled_s": trace.scheduled,
            "first_token_s": trace.first_token,
            "finish_s": trace.finish,
            "prompt_tokens": trace.prompt,
            "output_tokens": trace.output,
            "preemptions": trace.preemptions,
            "ttft_s": ttft,
            "tpot_s": tpot,
            "e2e_s": trace.finish - trace.arrival,
            "queue_s": trace.scheduled - trace.arrival,
        }
    )


def _stats(x: np.ndarray) -> dict[str, float]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": float("nan"), **{f"p{p}": float("nan") for p in PERCENTILES}}
    return {"mean": float(x.mean()), **{f"p{p}": float(np.percentile(x, p)) for p in PERCENTILES}}


def serving_summary(
    r: ResolvedScenario, table: pd.DataFrame, steps: pd.DataFrame, kv_capacity: int
) -> dict[str, Any]:
    """``summary.json`` of a serving run."""
    s = r.scenario
    sv = s.serving
    assert sv is not None
    counted = table.iloc[sv.requests.warmup :]
    done = counted[np.isfinite(counted.finish_s)]
    start = float(counted.arrival_s.min())
    end = float(done.finish_s.max()) if len(done) else start
    window = max(end - start, 1e-12)
    pool = sv.prefill  # (its GPUs fill its nodes: checked when the scenario was loaded)
    nodes = s.cluster.nodes + (0 if pool is None else pool.nodes)
    gpus = r.world + (0 if pool is None else pool.parallelism.world)
    ok = np.ones(len(done), dtype=bool)
    if sv.slo_ttft_s is not None:
        ok &= done.ttft_s.to_numpy() <= sv.slo_ttft_s
    if sv.slo_tpot_s is not None:
        ok &= ~(done.tpot_s.to_numpy() > sv.slo_tpot_s)
    inp, out = float(done.prompt_tokens.sum()), float(done.output_tokens.sum())
    dec = steps[steps.decoding > 0]
    return {
        "scenario": s.name,
        "model": r.model.name,
        "hardware": r.hardware.name,
        "mode": "serve",
        "seed": s.seed,
        "nodes": nodes,
        "gpus": gpus,
        "serving": {
            "requests": len(table),
            "counted": len(counted),
            "finished": len(done),
            "unfinished": int(len(counted) - len(done)),
            "disaggregated": sv.prefill is not None,
            "window_s": window,
            "ttft_s": _stats(done.ttft_s.to_numpy()),
            "tpot_s": _stats(done.tpot_s.to_numpy()),
            "e2e_s": _stats(done.e2e_s.to_numpy()),
            "queue_s": _stats(done.queue_s.to_numpy()),
            "request_rate_per_s": float(len(counted)) / window,
            "input_tokens_per_s": inp / window,
            "output_tokens_per_s": out / window,
            "output_tokens_per_s_per_node": out / window / nodes,
            "output_tokens_per_s_per_gpu": out / window / gpus,
            "input_tokens_per_s_per_node": inp / window / nodes,
            "goodput_requests_per_s": float(ok.sum()) / window,
            "slo_attained": float(ok.mean()) if len(ok) else 0.0,
            "preemptions": int(table.preemptions.sum()),
            "kv_capacity_tokens": int(kv_capacity),
            "kv_peak_tokens": int(steps.kv_tokens.max()) if len(steps) else 0,
            "decode_batch_mean": float(dec.decoding.mean()) if len(dec) else 0.0,
            "steps": len(steps),
        },
        "policies": s.policies.model_dump(mode="json"),
    }
