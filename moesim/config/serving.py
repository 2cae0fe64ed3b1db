"""The ``serving`` section of a scenario (``workload.mode: serve``; :mod:`moesim.serving`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from moesim.config.sections import MAX_NODES, AllToAll, Overlap, Parallelism, Section


class Lengths(Section):
    """Token lengths of generated requests (see :mod:`moesim.serving.requests`)."""

    dist: Literal["fixed", "uniform", "lognormal"] = Field("fixed", description="Distribution.")
    mean: int = Field(ge=1, le=2**22, description="Mean tokens.")
    min: int = Field(1, ge=1, le=2**22, description="Fewest tokens (uniform, lognormal).")
    max: int = Field(2**17, ge=1, le=2**22, description="Most tokens (uniform, lognormal).")
    sigma: float = Field(0.5, gt=0, le=4, description="Lognormal shape.")


class ServeRequests(Section):
    """Where requests come from."""

    arrival: Literal["poisson", "concurrency", "trace"] = Field(
        "poisson",
        description="poisson: at rate_per_s; concurrency: clients that each send their next "
        "request when the last finishes; trace: the trace file's times (a ShareGPT JSON has "
        "none: Poisson at rate_per_s).",
    )
    rate_per_s: float | None = Field(None, gt=0, le=1e6, description="Requests per second.")
    clients: int | None = Field(None, ge=1, le=1_000_000, description="Concurrent clients.")
    trace: str | None = Field(
        None,
        max_length=4096,
        description="A file of requests: moesim's, BurstGPT's or Azure's CSV, Mooncake's "
        "JSONL, or a ShareGPT JSON (see moesim.serving.requests).",
    )
    speedup: float = Field(
        1.0,
        gt=0,
        le=1e6,
        description="Replay the trace's arrivals this many times faster (its times divided "
        "by it), as load is scaled in trace-driven benchmarks.",
    )
    count: int = Field(1000, ge=1, le=10_000_000, description="Requests to serve.")
    duration_s: float | None = Field(
        None,
        gt=0,
        le=1e7,
        description="Serve the requests that arrive in the first duration_s seconds (count "
        "is then the most drawn or read); poisson or trace arrivals.",
    )
    warmup: int = Field(0, ge=0, description="First requests left out of the metrics.")
    input_len: Lengths = Lengths(mean=1024)
    output_len: Lengths = Lengths(mean=256)

    @model_validator(mode="after")
    def _source(self) -> ServeRequests:
        if self.arrival == "poisson" and self.rate_per_s is None:
            raise ValueError("arrival poisson needs rate_per_s")
        if self.arrival == "concurrency" and self.clients is None:
            raise ValueError("arrival concurrency needs clients")
        if self.arrival == "trace" and self.trace is None:
            raise ValueError("arrival trace needs trace (a file)")
        if self.duration_s is not None and self.arrival == "concurrency":
            raise ValueError(
                "duration_s needs poisson or trace arrivals (clients send as requests finish: "
                "give count)"
            )
        if self.speedup != 1.0 and self.arrival != "trace":
            raise ValueError("speedup scales a trace's arrivals: it needs arrival trace")
        if self.warmup >= self.count:
            raise ValueError(f"warmup ({self.warmup}) must be below count ({self.count})")
        return self


class PrefillPool(Section):
    """The prefill instances of a disaggregated deployment (the scenario's own cluster and
    parallelism are its decode instances)."""

    nodes: int = Field(ge=1, le=MAX_NODES, description="Nodes of prefill instances.")
    hardware: str | None = Field(
        None,
        max_length=256,
        description="Hardware profile of the prefill nodes (a name or a YAML file; default: "
        "the scenario's), e.g. compute-rich GPUs for prompts and others for decoding.",
    )
    parallelism: Parallelism = Parallelism()
    all_to_all: AllToAll | None = Field(None, description="Default: the scenario's.")
    overlap: Overlap | None = Field(None, description="Default: the scenario's.")
    cuda_graphs: bool = Field(False, description="Prefill kernels from CUDA graphs.")


class Serving(Section):
    """Serving requests (``workload.mode: serve``; :mod:`moesim.serving`)."""

    requests: ServeRequests
    max_prefill_tokens: int = Field(
        16384,
        ge=1,
        le=2**22,
        description="Tokens per step: prompt tokens of a prefill step (chunked prefill); with "
        "mixed batching, decode tokens (one per request) and prompt tokens together.",
    )
    kv_block_tokens: int = Field(64, ge=1, le=4096, description="Tokens per KV-cache page.")
    batching: Literal["alternate", "mixed"] = Field(
        "alternate",
        description="alternate: a step prefills or decodes, prefill first (SGLang's default); "
        "mixed: every step decodes the running requests and fills the rest of "
        "max_prefill_tokens with prompt chunks (vLLM's default, Sarathi-Serve).",
    )
    tokens_per_step: float = Field(
        1.0,
        ge=1.0,
        le=16.0,
        description="Mean tokens a request gains per decode step (MTP / speculative "
        "decoding acceptance; 1: none).",
    )
    slo_ttft_s: float | None = Field(None, gt=0, description="Goodput: time to first token.")
    slo_tpot_s: float | None = Field(None, gt=0, description="Goodput: time per output token.")
    prefill: PrefillPool | None = Field(
        None, description="Disaggregated prefill instances (None: co-located serving)."
    )
