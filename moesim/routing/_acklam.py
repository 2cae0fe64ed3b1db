"""Acklam's rational approximation of the normal quantile (relative error < 1.2e-9): its
coefficients, shared by the numpy and compiled group-limited draws, and the half-normal
score at a depth on numpy arrays."""

from __future__ import annotations

import numpy as np

_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02,
      1.383577518672690e02, -3.066479806614716e01, 2.506628277459239e00)  # fmt: skip
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02,
      6.680131188771972e01, -1.328068155288572e01)  # fmt: skip
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00,
      -2.549732539343734e00, 4.374664141464968e00, 2.938163982698783e00)  # fmt: skip
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00,
      3.754408661907416e00)  # fmt: skip


def half_normal_from_depth(depth: np.ndarray) -> np.ndarray:
    """The half-normal value at uniform quantile ``exp(-depth)``: ``-ppf((1 - u) / 2)``."""
    return -_normal_ppf_lower(-np.expm1(-depth.astype(np.float64)) / 2.0)


def _normal_ppf_lower(p: np.ndarray) -> np.ndarray:
    """Standard normal quantile for ``0 < p <= 0.5`` (Acklam's algorithm)."""
    low = p < 0.02425
    q = np.sqrt(-2.0 * np.log(np.where(low, np.maximum(p, 1e-300), 0.02425)))
    tail = _poly(_C, q) / (_poly(_D, q) * q + 1.0)
    r0 = np.where(low, 0.3, p) - 0.5
    r = r0 * r0
    mid = _poly(_A, r) * r0 / (_poly(_B, r) * r + 1.0)
    return np.where(low, tail, mid)


def _poly(coef: tuple[float, ...], x: np.ndarray) -> np.ndarray:
    acc = np.full_like(x, coef[0])
    for c in coef[1:]:
        acc = acc * x + c
    return acc
