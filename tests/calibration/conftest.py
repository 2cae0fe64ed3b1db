"""A small MoE model whose expert FFN is cheap enough to measure on a CPU in a test."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_MODEL = """\
name: tiny-moe
source: test model for calibration (moesim tests)
hidden_size: 256
num_layers: 4
vocab_size: 1024
attention: {type: gqa, num_heads: 4, num_kv_heads: 4, head_dim: 64}
moe:
  num_experts: 8
  top_k: 2
  expert_intermediate_size: 512
"""


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-moe.yaml"
    path.write_text(TINY_MODEL, encoding="utf-8")
    return path
