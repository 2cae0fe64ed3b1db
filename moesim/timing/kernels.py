"""Kernel-level timing: GEMMs with tile and wave quantisation and measured efficiency curves,
attention kernels, and memory-bound kernels.

A GEMM's time is its *quantised roofline* divided by an *efficiency* looked up in the
profile's tables (:class:`moesim.hardware.profile.GemmTable`):

- the roofline pads the rows of every group to the kernel's block, counts the output tiles,
  runs them in waves over the SMs that compute may use (splitting K when the tiles are too
  few to fill the SMs), and takes the larger of that compute
  time and the bytes moved (weights of every group, inputs, outputs) over peak HBM bandwidth;
- the efficiency of a measured point is its roofline time over its measured time, so the table
  is reproduced exactly at its points. Between the ``m`` of one ``(n, k)`` shape the efficiency
  is interpolated as a power law (linear in log-log); beyond the measured ``m`` it is held.
  Time is monotone in ``m`` up to the efficiency's rise inside one wave of the quantised
  roofline (under 0.1% on the shipped tables: ``tests/timing/test_costs.py``).
  Other ``(n, k)`` shapes take an inverse-square-distance mean of the nearest measured shapes'
  efficiencies in ``(log n, log k)`` at the same ``m``.

Where no table exists for a dtype and layout, a dense table of the dtype is used for grouped
layouts, and else the profile's flat ``matmul_efficiency`` (the op's ``source`` says which).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from moesim.hardware.profile import AttentionTable, GemmTable, HardwareProfile

Arr = npt.NDArray[np.float64]
LAYOUT_FALLBACK = {"dense": ("dense",), "contiguous": ("contiguous", "dense"),
                   "masked": ("masked", "contiguous", "dense")}  # fmt: skip
NEAREST_SHAPES = 4
SPLIT_K_MIN = 128
"""Smallest slice of K one split-K work unit takes (one 128-deep FP8 scale block)."""


@dataclass(frozen=True)
class GemmOperands:
    """Bytes per element of a GEMM's weights, inputs and outputs."""

    weight: float
    inputs: float
    output: float


class GemmRoofline:
    """Quantised roofline of a (grouped) GEMM on one GPU.

    Args:
        hw: Hardware profile (peak FLOP/s per dtype, HBM bandwidth, SMs, GEMM block).
        sms: SMs compute may use (fewer while communication kernels hold some).
    """

    def __init__(self, hw: HardwareProfile, sms: int) -> None:
        self.hw = hw
        self.sms = sms
        self.block_m, self.block_n = hw.kernels.gemm_block
        self.bw = hw.gpu.hbm_bandwidth_gb_per_s * 1e9

    def parts(
        self,
        m: npt.ArrayLike,
        n: npt.ArrayLike,
        k: npt.ArrayLike,
        groups: npt.ArrayLike,
        dtype: str,
        ops: GemmOperands,
    ) -> tuple[Arr, Arr]:
        """Compute seconds (quantised) and memory seconds at peak rates; ``m`` is the total of
        rows already padded per group (all arguments broadcast). The roofline time is the larger
        of the two."""
        mm = np.asarray(m, dtype=np.float64)
        g = np.asarray(groups, dtype=np.float64)
        kk = np.asarray(k, dtype=np.float64)
        nn = np.asarray(n, dtype=np.float64)
        tiles = np.maximum(np.ceil(mm / self.block_m) * np.ceil(nn / self.block_n), 1.0)
        # too few tiles to fill the SMs: the kernel splits K (cuBLAS split-K, stream-K)
        split = np.clip(np.floor(self.sms / tiles), 1.0, np.maximum(np.ceil(kk / SPLIT_K_MIN), 1.0))
        waves = np.ceil(tiles * split / self.sms)
        per_sm = self.hw.peak_flops(dtype) / self.hw.gpu.sm_count
        compute = waves * 2.0 * self.block_m * self.block_n * (kk / split) / per_sm
        nbytes = g * nn * kk * ops.weight + mm * kk * ops.inputs + mm * nn * ops.output
        return np.where(mm > 0, compute, 0.0), np.where(mm > 0, nbytes / self.bw, 0.0)


class GemmCurve:
    """Efficiency of one table as a function of ``(m, n, k)`` (see the module docstring).

    Args:
        table: The measured or published points.
        roof: The roofline the efficiencies are taken against (at all SMs).
        ops: Operand bytes of the table's kernel.
    """

    def __init__(self, table: GemmTable, roof: GemmRoofline, ops: GemmOperands) -> None:
        self.table = table
        pts = np.asarray(table.points, dtype=np.float64)
        groups, m, n, k, tflops = pts.T
        seconds = 2.0 * groups * m * n * k / (tflops * 1e12)
        rows = point_rows(table.layout, groups, m, roof.block_m)
        eff = np.maximum(*roof.parts(rows, n, k, groups, table.dtype, ops)) / seconds
        per_group = rows / groups
        self.shapes: list[tuple[float, float, Arr, Arr]] = []
        for nk in sorted({(a, b) for a, b in zip(n, k, strict=True)}):
            sel = np.flatnonzero((n == nk[0]) & (k == nk[1]))
            sel = sel[np.argsort(per_group[sel])]
            self.shapes.append(
                (np.log2(nk[0]), np.log2(nk[1]), np.log(per_group[sel]), np.log(eff[sel]))
            )

    def efficiency(
        self, m: npt.ArrayLike, n: float, k: npt.ArrayLike, groups: npt.ArrayLike = 1
    ) -> Arr:
        """Efficiency at ``m`` rows (padded) in ``groups`` groups for the ``(n, k)`` shape
        (interpolated in the rows per group; ``m``, ``k`` and ``groups`` broadcast)."""
        per_group = np.asarray(m, dtype=np.float64) / np.maximum(np.asarray(groups), 1)
        logm, lk = np.broadcast_arrays(
            np.log(np.maximum(per_group, 1.0)), np.log2(np.asarray(k, dtype=np.float64))
        )
        ln = np.log2(n)
        dist = np.stack([(s[0] - ln) ** 2 + (s[1] - lk) ** 2 for s in self.shapes])
        logeff = np.stack([np.interp(logm, s[2], s[3]) for s in self.shapes])
        nearest = np.argsort(dist, axis=0, kind="stable")[:NEAREST_SHAPES]
        d = np.take_along_axis(dist, nearest, axis=0)
        e = np.take_along_axis(logeff, nearest, axis=0)
        exact = d[0] == 0.0
        w = 1.0 / np.where(d == 0.0, 1.0, d)
        blended = (w * e).sum(axis=0) / w.sum(axis=0)
        return np.exp(np.where(exact, e[0], blended))


class GemmModel:
    """Seconds of GEMMs of one dtype on one GPU, from the profile's tables.

    Args:
        hw: Hardware profile.
        sms: SMs compute may use.
    """

    def __init__(self, hw: HardwareProfile, sms: int) -> None:
        self.hw = hw
        self.roof = GemmRoofline(hw, sms)
        full = GemmRoofline(hw, hw.gpu.sm_count)  # tables were measured on every SM
        self._curves: dict[tuple[str, str], GemmCurve] = {}
        for t in hw.kernels.gemm:
            key = (t.dtype, t.layout)
            if key not in self._curves:  # the first table of a dtype and layout is used
                self._curves[key] = GemmCurve(t, full, operands(t.dtype))

    def curve(self, dtype: str, layout: str) -> GemmCurve | None:
        """The table for ``dtype`` and ``layout`` (grouped layouts fall back to dense)."""
        for lay in LAYOUT_FALLBACK[layout]:
            c = self._curves.get((dtype, lay))
            if c is not None:
                return c
        return None

    def source(self, dtype: str, layout: str) -> str:
        """Which table (or the flat efficiency) prices this dtype and layout."""
        c = self.curve(dtype, layout)
        if c is None:
            g = self.hw.gpu
            return (
                f"roofline ({dtype}) x matmul_efficiency {g.matmul_efficiency:g} / "
                f"memory_efficiency {g.memory_efficiency:g}"
            )
        t = c.table
        return f"{t.kernel} {t.dtype} {t.layout} table ({t.status}: {t.source})"

    def time(
        self,
        m: npt.ArrayLike,
        n: float,
        k: npt.ArrayLike,
        dtype: str,
        layout: str = "dense",
        groups: npt.ArrayLike = 1,
    ) -> Arr:
        """Seconds of ``groups`` GEMMs totalling ``m`` padded rows of ``(n, k)``."""
        ops = operands(dtype)
        c = self.curve(dtype, layout)
        if c is None:  # flat efficiencies: matmul for compute, memory for bytes
            compute, memory = self.roof.parts(m, n, k, groups, dtype, ops)
            gpu = self.hw.gpu
            return np.maximum(compute / gpu.matmul_efficiency, memory / gpu.memory_efficiency)
        roof = np.maximum(*self.roof.parts(m, n, k, groups, dtype, ops))
        return roof / c.efficiency(m, n, k, groups)


def operands(dtype: str) -> GemmOperands:
    """Operand bytes: FP8 GEMMs read FP8 weights and block-scaled FP8 inputs and write BF16
    (DeepGEMM, Transformer Engine); others read and write their own dtype."""
    from moesim.dtypes import ELEMENT_BYTES, FP8_SCALE_BLOCK, FP8_SCALE_BYTES

    if dtype == "fp8":
        return GemmOperands(1.0, 1.0 + FP8_SCALE_BYTES / FP8_SCALE_BLOCK, 2.0)
    b = ELEMENT_BYTES[dtype]
    return GemmOperands(b, b, b)


def point_rows(layout: str, groups: npt.ArrayLike, m: npt.ArrayLike, block: int) -> Arr:
    """The rows a table point of ``groups`` x ``m`` is priced at: as measured for a dense GEMM
    (the roofline's tiles pad them), each group's padded to the block for grouped layouts (as
    their callers pad them)."""
    g = np.asarray(groups, dtype=np.float64)
    return g * (np.asarray(m, dtype=np.float64) if layout == "dense" else pad_rows(m, block))


def pad_rows(tokens: npt.ArrayLike, block: int) -> Arr:
    """Rows after padding each group's ``tokens`` up to a multiple of ``block`` (0 stays 0)."""
    t = np.asarray(tokens, dtype=np.float64)
    return np.ceil(t / block) * block


class AttentionModel:
    """Attention-core kernels: prefill by FLOPs at a length-dependent rate, decode by the KV
    bytes read or the FLOPs, whichever is slower.

    Args:
        hw: Hardware profile.
        family: ``gqa`` or ``mla`` (tables for ``any`` match both).
        sm_share: Share of the SMs compute may use.
    """

    def __init__(self, hw: HardwareProfile, family: str, sm_share: float) -> None:
        self.hw, self.share = hw, sm_share
        fits = [t for t in hw.kernels.attention if t.attention in (family, "any")]
        self.prefill: AttentionTable | None = next((t for t in fits if t.kind == "prefill"), None)
        self.decode: AttentionTable | None = next((t for t in fits if t.kind == "decode"), None)

    def flat_flops(self, dtype: str) -> float:
        return self.hw.peak_flops(dtype) * self.hw.gpu.matmul_efficiency

    def prefill_time(self, flops: float, seq_len: float, dtype: str) -> float:
        """Seconds of a causal attention forward of ``flops`` over sequences of ``seq_len``."""
        t = self.prefill
        if t is None:
            rate = self.flat_flops(dtype)
        else:
            pts = np.asarray(t.points)
            rate = 1e12 * float(np.interp(np.log(max(seq_len, 1.0)), np.log(pts[:, 0]), pts[:, 1]))
        return flops / (rate * self.share)

    def decode_time(self, flops: float, kv_bytes: float, dtype: str) -> float:
        """Seconds of a decode attention reading ``kv_bytes`` and computing ``flops``."""
        t = self.decode
        bw = self.hw.gpu.hbm_bandwidth_gb_per_s * 1e9 * self.hw.gpu.memory_efficiency
        rate = self.flat_flops(dtype)
        if t is not None and t.gb_per_s is not None and t.tflops is not None:
            bw, rate = t.gb_per_s * 1e9, t.tflops * 1e12
        return max(flops / (rate * self.share), kv_bytes / bw)

    def source(self, kind: str) -> str:
        t = self.prefill if kind == "prefill" else self.decode
        if t is None:
            return f"roofline x matmul_efficiency {self.hw.gpu.matmul_efficiency:g}"
        return f"{t.kernel} {t.kind} table ({t.status}: {t.source})"
