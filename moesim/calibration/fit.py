"""The calibrated expert-time model and its fit.

A grouped expert FFN over a per-expert token vector ``v`` takes

    T(v) = c * [any v_i > 0] + sum_i f(v_i),   f(0) = 0,

where ``f`` is piecewise linear in ``log2(tokens)`` between grid points and grows linearly in
tokens past the last one, and ``c`` is the fixed cost of the call. Because ``f`` at a token
count is a fixed linear combination of its values at the grid points, ``T`` is linear in the
unknowns ``(c, f_1 .. f_K)``: the fit is a least-squares problem in relative error over the
uniform and uneven cases, with ``c >= 0`` and ``f >= 0`` (an active-set NNLS). ``f`` is not
forced to be monotone: libraries switch kernels with the shape, and a few more tokens can
be faster (measured on CPU BLAS). Held-out cases (never in the fit) measure how well the
model predicts token distributions it has not seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ExpertTimeTable:
    """``f`` at ``tokens`` (ascending, >= 1) and the per-call cost ``overhead_s``."""

    tokens: np.ndarray
    seconds: np.ndarray
    overhead_s: float

    def per_expert(self, n: np.ndarray) -> np.ndarray:
        """``f(n)`` elementwise (0 where ``n == 0``)."""
        n = np.asarray(n, dtype=np.float64)
        lx = np.log2(self.tokens)
        inside = np.interp(np.log2(np.maximum(n, 1.0)), lx, self.seconds)
        top = self.tokens[-1]
        beyond = self.seconds[-1] * n / top
        return np.where(n <= 0, 0.0, np.where(n > top, beyond, inside))

    def predict(self, counts: np.ndarray) -> np.ndarray:
        """``[..., experts]`` token counts -> ``[...]`` seconds."""
        counts = np.asarray(counts, dtype=np.float64)
        busy = (counts > 0).any(axis=-1)
        return self.per_expert(counts).sum(axis=-1) + np.where(busy, self.overhead_s, 0.0)


def _basis(tokens: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Rows: ``[1, w_1 .. w_K]`` with ``sum_i f(v_i) = sum_k w_k f_k`` for each case."""
    k = len(tokens)
    rows = np.zeros((len(counts), k + 1))
    rows[:, 0] = 1.0
    lx = np.log2(tokens)
    eye = np.eye(k)
    for r, v in enumerate(counts):
        for n in v[v > 0]:
            if n > tokens[-1]:
                rows[r, k] += n / tokens[-1]
            else:
                ln = np.log2(max(float(n), 1.0))
                rows[r, 1:] += [np.interp(ln, lx, eye[j]) for j in range(k)]
    return rows


def nnls(a: np.ndarray, b: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """Least squares with ``x >= 0`` (Lawson-Hanson active set)."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = a.T @ (b - a @ x)
    for _ in range(max_iter):
        if passive.all() or w[~passive].max(initial=-np.inf) <= 1e-12 * np.abs(w).max():
            break
        passive[np.argmax(np.where(passive, -np.inf, w))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg] + 1e-300))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
        w = a.T @ (b - a @ x)
    return x


def fit_table(tokens: np.ndarray, counts: list[np.ndarray], seconds: np.ndarray) -> ExpertTimeTable:
    """Fit ``(c, f)`` at grid ``tokens`` to measured ``seconds`` of the ``counts`` vectors."""
    tokens = np.asarray(tokens, dtype=np.float64)
    seconds = np.asarray(seconds, dtype=np.float64)
    basis = _basis(tokens, np.array([np.asarray(c) for c in counts], dtype=object))
    params = nnls(basis / seconds[:, None], np.ones(len(seconds)))
    return ExpertTimeTable(tokens, params[1:], float(params[0]))


def fit_cases(records: list[dict[str, Any]]) -> tuple[ExpertTimeTable, dict[str, Any]]:
    """Fit one shape's measured cases (raw-file records) and check it on the held-out ones.

    Returns:
        The table and a check: relative errors of the held-out cases (``max``, ``median``,
        per-case list) and of the fitted ones.
    """
    train = [r for r in records if not r["holdout"]]
    held = [r for r in records if r["holdout"]]
    grid = sorted({r["counts"][0] for r in train if r["label"].startswith("uniform")})
    table = fit_table(
        np.array(grid),
        [np.array(r["counts"]) for r in train],
        np.array([r["seconds"] for r in train]),
    )

    def errors(rs: list[dict[str, Any]]) -> list[float]:
        return [float(table.predict(np.array(r["counts"])) / r["seconds"] - 1.0) for r in rs]

    held_err, train_err = errors(held), errors(train)
    check = {
        "holdout_cases": len(held),
        "holdout_max_abs_error": max((abs(e) for e in held_err), default=0.0),
        "holdout_median_abs_error": float(np.median(np.abs(held_err))) if held_err else 0.0,
        "holdout": [
            {"label": r["label"], "measured_s": r["seconds"], "error": e}
            for r, e in zip(held, held_err, strict=True)
        ],
        "fit_max_abs_error": max((abs(e) for e in train_err), default=0.0),
        "fit_median_abs_error": float(np.median(np.abs(train_err))) if train_err else 0.0,
    }
    return table, check
