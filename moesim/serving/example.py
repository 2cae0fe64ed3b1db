"""The shipped request trace, ``scenarios/traces/chat-requests.csv``, made by this module::

    python -m moesim.serving.example --out scenarios/traces/chat-requests.csv

A chat workload shaped as the Azure LLM inference trace 2023, conversation service
(Azure/AzurePublicDataset, ``data/AzureLLMInferenceTrace_conv.csv``: the trace of Patel et al.,
"Splitwise", ISCA 2024, that Vidur also replays). Its first 429 requests (2023-11-16 18:15:46.7
to 18:17:40.6) give the figures used here: 3.76 requests per second; prompt tokens with
log-mean 6.410 and log-standard deviation 1.046 (median 990, mean 911, largest 4,107);
generated tokens with log-mean 5.287 and log-standard deviation 0.886 (median 217, mean 264,
largest 652). Lengths are drawn lognormal with those log moments, each independently (in the
sample their logarithms correlate 0.29; not modelled), prompts clipped to [1, 8192] and
outputs to [1, 2048]; arrivals are a Poisson process at the sample's rate. Nothing of the
trace itself is copied; the real trace can be replayed as it is (``arrival: trace``, the
reader takes Azure's columns).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moesim.serving.requests import lengths, poisson_arrivals

RATE_PER_S = 429 / 113.94
"""Requests per second of the sample: 429 requests from 18:15:46.68 to 18:17:40.62."""
PROMPT_LOG_MEAN, PROMPT_LOG_STD = 6.410, 1.046
OUTPUT_LOG_MEAN, OUTPUT_LOG_STD = 5.287, 0.886
PROMPT_MAX, OUTPUT_MAX = 8192, 2048
COUNT, SEED = 1000, 2023


def chat_requests(count: int = COUNT, seed: int = SEED) -> str:
    """The trace as CSV text (moesim's columns: arrival_s, input_tokens, output_tokens)."""
    rng = np.random.default_rng(seed)
    arrival = poisson_arrivals(RATE_PER_S, count, rng)
    arrival -= arrival[0]
    prompt = _lognormal(PROMPT_LOG_MEAN, PROMPT_LOG_STD, PROMPT_MAX, count, rng)
    output = _lognormal(OUTPUT_LOG_MEAN, OUTPUT_LOG_STD, OUTPUT_MAX, count, rng)
    rows = [f"{t:.6f},{p},{o}" for t, p, o in zip(arrival, prompt, output, strict=True)]
    return "arrival_s,input_tokens,output_tokens\n" + "\n".join(rows) + "\n"


def _lognormal(
    log_mean: float, log_std: float, most: int, count: int, rng: np.random.Generator
) -> np.ndarray:
    """Token lengths with these log moments, clipped to [1, most] (:func:`lengths` takes the
    arithmetic mean, ``exp(log_mean + log_std^2 / 2)``)."""
    mean = round(float(np.exp(log_mean + log_std**2 / 2)))
    return lengths("lognormal", mean, 1, most, log_std, count, rng)


def main() -> None:
    """Write the trace (refusing to overwrite a file)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="CSV file to write.")
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; moesim never overwrites a file")
    args.out.write_text(chat_requests(), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
