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
    layers, _, k = experts.shape
    meta = TraceMeta("hand-made", num_experts, k, layers, "test")
    return Trace.from_layers(meta, experts, seq_len=seq_len, **cols)
