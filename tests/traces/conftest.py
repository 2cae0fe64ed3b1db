"""Helpers for trace tests: small traces built by hand, and the shared real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moesim.traces.format import Trace, TraceMeta
from tests.conftest import ROOT

DATA = ROOT.parent / "shared" / "data"
VLLM = DATA / "qwen1.5-moe-vllm-gsm8k"
COUNTS = DATA / "olmoe-routing-stats"


def needs(path: Path) -> pytest.MarkDecorator:
    """Skip (with the reason) when the shared real data is not beside the project."""
    return pytest.mark.skipif(not path.exists(), reason=f"real routing data absent: {path}")


def make_trace(
    experts: np.ndarray, num_experts: int, seq_len: int | None = None, **cols: np.ndarray
) -> Trace:
    """A trace from ``experts[layers, tokens, k]``: one step, sequences of ``seq_len``."""
    layers, tokens, k = experts.shape
    length = seq_len or tokens
    t = np.arange(tokens)
    return Trace(
        meta=TraceMeta("hand-made", num_experts, k, layers, "test"),
        step=np.zeros(layers * tokens, dtype=np.int32),
        layer=np.repeat(np.arange(layers), tokens).astype(np.int16),
        seq=np.tile(t // length, layers).astype(np.int32),
        pos=np.tile(t % length, layers).astype(np.int32),
        experts=experts.reshape(-1, k).astype(np.int16),
        **cols,
    )
