"""Bytes per element of the numeric formats that MoE systems move and compute in.

FP8 activations on the wire carry one float32 scale per 128 values (DeepEP, DeepSeek-V3), so a
token of ``hidden`` FP8 values occupies ``hidden * (1 + 4/128)`` bytes.
"""

from __future__ import annotations

from typing import Literal

DType = Literal["fp32", "bf16", "fp16", "fp8"]

ELEMENT_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0}
FP8_SCALE_BLOCK = 128
FP8_SCALE_BYTES = 4


def token_bytes(hidden: int, dtype: str) -> float:
    """Bytes of one token's activation vector of width ``hidden`` in ``dtype`` on the wire.

    Args:
        hidden: Hidden size (values per token).
        dtype: One of ``fp32``, ``bf16``, ``fp16``, ``fp8``; fp8 includes its per-128 scales.

    Returns:
        Bytes per token.
    """
    if dtype == "fp8":
        return hidden * (1.0 + FP8_SCALE_BYTES / FP8_SCALE_BLOCK)
    return hidden * ELEMENT_BYTES[dtype]
