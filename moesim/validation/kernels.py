"""The kernel tables of the shipped profiles, reproduced by the cost model at their points.

A table's points are inputs (published or measured), not predictions; this check proves the
cost model prices each of them as the table says (tile quantisation, operand bytes and the
efficiency interpolation included), so that a change that breaks it is seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moesim.hardware.catalog import load_profile
from moesim.hardware.profile import HardwareProfile
from moesim.timing.kernels import AttentionModel, GemmModel, point_rows


@dataclass(frozen=True)
class TableRow:
    """How well one table's points are reproduced."""

    profile: str
    table: str
    status: str
    points: int
    max_error: float

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return dict(self.__dict__)


def table_rows(hw: HardwareProfile) -> list[TableRow]:
    """One row per GEMM and prefill attention table of ``hw``."""
    rows = []
    gm = GemmModel(hw, hw.gpu.sm_count)
    block = hw.kernels.gemm_block[0]
    for t in hw.kernels.gemm:
        errors = []
        for g, m, n, k, tflops in t.points:
            rows_ = point_rows(t.layout, g, m, block)
            want = 2.0 * g * m * n * k / (tflops * 1e12)
            errors.append(abs(float(gm.time(rows_, n, k, t.dtype, t.layout, g)) / want - 1))
        name = f"gemm {t.kernel} {t.dtype} {t.layout}"
        rows.append(TableRow(hw.name, name, t.status, len(t.points), max(errors)))
    for a in hw.kernels.attention:
        if a.kind != "prefill":
            continue
        model = AttentionModel(hw, a.attention if a.attention != "any" else "gqa", 1.0)
        errors = [
            abs(1e12 * tflops * model.prefill_time(1.0, seq, a.dtype) - 1)
            for seq, tflops in a.points
        ]
        rows.append(
            TableRow(hw.name, f"attention {a.kernel} prefill", a.status, len(a.points), max(errors))
        )
    return rows


SHIPPED = Path(__file__).resolve().parents[1] / "hardware" / "profiles"


def validate_kernel_tables() -> list[TableRow]:
    """Every shipped profile's tables."""
    paths = sorted(SHIPPED.glob("*.yaml"))
    return [row for p in paths for row in table_rows(load_profile(str(p)))]
