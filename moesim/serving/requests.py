"""Requests to serve: generated (Poisson arrivals or a fixed number of clients) or read from a
trace file.

Formats read (by extension and columns):

- ``.csv`` with ``arrival_s, input_tokens, output_tokens`` (moesim's own), BurstGPT's
  columns ``Timestamp, Request tokens, Response tokens`` (Wang et al., BurstGPT, arXiv
  2401.17644; rows with no response, failures, are skipped), or the Azure LLM inference
  trace's ``TIMESTAMP, ContextTokens, GeneratedTokens`` (Azure/AzurePublicDataset 2023 and
  2024, the Splitwise and DynamoLLM traces that Vidur replays; TIMESTAMP is a date and time);
- ``.jsonl``: Mooncake's trace (kvcache-ai/Mooncake, arXiv 2407.00079), one JSON object per
  line with ``timestamp`` (milliseconds), ``input_length`` and ``output_length`` (its
  ``hash_ids``, the prompt's KV blocks for prefix caching, are not used yet);
- ``.json``: a ShareGPT-style list of ``{"conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}, ...]}``: each human turn and the reply after it is a request,
  its lengths counted as characters / 4 (OpenAI's rule of thumb for English text, as
  benchmark scripts without a tokenizer do); ShareGPT has no timestamps, so arrivals are
  drawn as configured.

Generated lengths: ``fixed``, ``uniform`` (on ``[min, max]``) or ``lognormal`` (median
``mean * exp(-sigma^2 / 2)`` so that the mean is ``mean``, clipped to ``[min, max]``): the
shape Vidur and LLMServingSim use for synthetic traces.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np

from moesim.errors import ConfigError

CHARS_PER_TOKEN = 4.0
"""Characters per token for texts without a tokenizer (OpenAI: "one token generally
corresponds to ~4 characters of text for common English text")."""


@dataclass(frozen=True)
class Requests:
    """Requests, in arrival order: ``arrival_s`` (NaN: arrivals drawn later), ``prompt`` and
    ``output`` tokens."""

    arrival_s: np.ndarray
    prompt: np.ndarray
    output: np.ndarray

    @property
    def count(self) -> int:
        """Requests."""
        return int(self.prompt.size)


def lengths(
    dist: str, mean: int, low: int, high: int, sigma: float, n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` token lengths (see the module docstring)."""
    if dist == "fixed":
        return np.full(n, mean, dtype=np.int64)
    if dist == "uniform":
        return rng.integers(low, high + 1, size=n).astype(np.int64)
    draw = rng.lognormal(np.log(mean) - sigma**2 / 2, sigma, size=n)
    return np.clip(np.rint(draw), low, high).astype(np.int64)


def poisson_arrivals(rate_per_s: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process: exponential gaps of mean ``1 / rate``."""
    return np.cumsum(rng.exponential(1.0 / rate_per_s, size=n))


def read_trace(path: Path, limit: int) -> Requests:
    """The first ``limit`` requests of a trace file (see the module docstring).

    Raises:
        ConfigError: unreadable file, unknown columns, or no requests.
    """
    field = "serving.requests.trace"
    if not path.is_file():
        raise ConfigError(path, field, "no such file")
    if path.suffix == ".json":
        return _sharegpt(path, limit)
    if path.suffix == ".jsonl":
        return _mooncake(path, limit)
    if path.suffix != ".csv":
        raise ConfigError(
            path, field, f"expected a .csv, .json or .jsonl trace, got {path.suffix!r}"
        )
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError(path, field, "the trace has no rows")
    cols = set(rows[0])
    keys = next((k for k in CSV_COLUMNS if set(k) <= cols), None)
    if keys is None:
        raise ConfigError(
            path,
            field,
            "expected columns arrival_s, input_tokens, output_tokens (or BurstGPT's "
            "Timestamp, Request tokens, Response tokens, or Azure's TIMESTAMP, ContextTokens, "
            f"GeneratedTokens); found {', '.join(sorted(cols))}",
        )
    clock = _seconds if keys[0] == "TIMESTAMP" else float
    out = []
    for i, row in enumerate(rows):
        try:
            t, a, b = clock(row[keys[0]]), int(float(row[keys[1]])), int(float(row[keys[2]]))
        except ValueError as e:
            raise ConfigError(path, field, f"row {i + 2}: {e}") from e
        if a > 0 and b > 0:
            out.append((t, a, b))
        if len(out) == limit:
            break
    return _timed(path, out)


CSV_COLUMNS = (
    ("arrival_s", "input_tokens", "output_tokens"),
    ("Timestamp", "Request tokens", "Response tokens"),
    ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
)
"""Columns of the CSV traces read: arrival, input tokens, output tokens."""


def _seconds(stamp: str) -> float:
    """Seconds since the epoch of a date and time such as ``2023-11-16 18:15:46.6805900``."""
    ns = np.datetime64(stamp.strip().replace(" ", "T"), "ns")
    return float(ns.astype(np.int64)) / 1e9


def _mooncake(path: Path, limit: int) -> Requests:
    field = "serving.requests.trace"
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                t = float(row["timestamp"]) / 1e3
                a, b = int(row["input_length"]), int(row["output_length"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ConfigError(
                    path,
                    field,
                    f"line {i + 1}: expected a JSON object with timestamp (ms), input_length "
                    f"and output_length ({type(e).__name__}: {e})",
                ) from e
            if a > 0 and b > 0:
                out.append((t, a, b))
            if len(out) == limit:
                break
    return _timed(path, out)


def _timed(path: Path, out: list[tuple[float, int, int]]) -> Requests:
    """Requests from (arrival, input, output) rows: arrivals from the first, never
    decreasing."""
    field = "serving.requests.trace"
    if not out:
        raise ConfigError(path, field, "no request with input and output tokens")
    arr = np.array(out, dtype=np.float64)
    arrival = arr[:, 0] - arr[0, 0]
    if (np.diff(arrival) < 0).any():
        raise ConfigError(path, field, "arrival times must not decrease")
    return Requests(arrival, arr[:, 1].astype(np.int64), arr[:, 2].astype(np.int64))


def _sharegpt(path: Path, limit: int) -> Requests:
    field = "serving.requests.trace"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(path, field, f"not JSON: {e}") from e
    if not isinstance(doc, list):
        raise ConfigError(path, field, "expected a list of conversations")
    prompts, outputs = [], []
    for conv in doc:
        turns = conv.get("conversations", []) if isinstance(conv, dict) else []
        for q, a in pairwise(turns):
            if q.get("from") == "human" and a.get("from") == "gpt":
                p = round(len(str(q.get("value", ""))) / CHARS_PER_TOKEN)
                o = round(len(str(a.get("value", ""))) / CHARS_PER_TOKEN)
                if p > 0 and o > 0:
                    prompts.append(p)
                    outputs.append(o)
        if len(prompts) >= limit:
            break
    if not prompts:
        raise ConfigError(path, field, "no human turn followed by a gpt reply")
    n = min(limit, len(prompts))
    return Requests(
        np.full(n, np.nan), np.array(prompts[:n], np.int64), np.array(outputs[:n], np.int64)
    )
