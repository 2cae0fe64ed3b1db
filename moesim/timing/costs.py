"""Compute-cost models: how long a kernel takes on one GPU.

:class:`CostModel` is the interface the engine uses; :class:`RooflineCostModel` is the default
(each kernel takes ``max(FLOPs / (peak * matmul_efficiency), bytes / (HBM * memory_efficiency))``
plus a launch overhead). :class:`CalibratedCostModel` replaces the expert FFN time with the
table that ``moesim calibrate`` measured for this shape and dtype, falling back to the roofline
where the profile has none; :func:`cost_model` picks and says which source each cost came from.

Expert compute depends on the whole vector of tokens per expert, not only its sum: every expert
with tokens reads its weights once (decode is weight-bandwidth bound), and experts without
tokens cost nothing.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from moesim.dtypes import ELEMENT_BYTES
from moesim.hardware.profile import Calibration, ExpertCalibration, HardwareProfile
from moesim.models.spec import ModelSpec

ACT_BYTES = 2.0  # activations are kept in bf16
Num = npt.ArrayLike


class CostModel(Protocol):
    """Seconds of compute for the pieces of a layer; arrays broadcast over leading axes."""

    source: str
    sources: dict[str, str]  # per kernel family (experts, gemm, attention): which model

    def experts(self, slot_tokens: np.ndarray) -> np.ndarray:
        """``[..., slots]`` tokens per local expert slot -> ``[...]`` seconds (forward)."""
        ...

    def gemm(self, tokens: Num, params: float) -> np.ndarray:
        """A dense matmul block of ``params`` weight elements applied to ``tokens`` tokens."""
        ...

    def attention(self, tokens: int, sequences: int, context: float, kv_tokens: float) -> float:
        """One attention block: ``tokens`` queries over ``context`` keys each on average;
        ``kv_tokens`` cached keys read from HBM."""
        ...


class RooflineCostModel:
    """Roofline costs from the profile's peak rates and efficiencies.

    Args:
        hw: Hardware profile.
        model: Model description.
        dtype: Weight and compute dtype.
        tp: Tensor-parallel degree (weights and FLOPs of a GPU are 1/tp of the layer's).
    """

    source = "roofline"

    def __init__(self, hw: HardwareProfile, model: ModelSpec, dtype: str, tp: int) -> None:
        self.model, self.tp = model, tp
        self.sources = dict.fromkeys(("experts", "gemm", "attention"), "roofline")
        self.flops = hw.peak_flops(dtype) * hw.gpu.matmul_efficiency
        self.bw = hw.gpu.hbm_bandwidth_gb_per_s * 1e9 * hw.gpu.memory_efficiency
        self.launch = hw.gpu.kernel_launch_s
        self.wbytes = ELEMENT_BYTES[dtype]

    def _roof(self, flops: Num, nbytes: Num) -> np.ndarray:
        return np.maximum(np.asarray(flops) / self.flops, np.asarray(nbytes) / self.bw)

    def experts(self, slot_tokens: np.ndarray) -> np.ndarray:
        """Grouped GEMM over the local experts (gate/up, activation, down)."""
        m = self.model
        n = slot_tokens.astype(np.float64)
        params = m.expert_params / self.tp
        width = m.moe.expert_intermediate_size / self.tp
        flops = 2.0 * n * params
        act = n * (2 * m.hidden_size + (m.moe.matrices + 1) * width) * ACT_BYTES
        nbytes = np.where(n > 0, params * self.wbytes, 0.0) + act
        busy = (n > 0).any(axis=-1)
        kernels = m.moe.matrices + 1
        return self._roof(flops, nbytes).sum(axis=-1) + np.where(busy, kernels * self.launch, 0.0)

    def gemm(self, tokens: Num, params: float) -> np.ndarray:
        """Dense FFN / gate / shared-expert block of ``params`` elements (before the tp split)."""
        t = np.asarray(tokens, dtype=np.float64)
        p = params / self.tp
        flops = 2.0 * t * p
        nbytes = p * self.wbytes + t * 2 * self.model.hidden_size * ACT_BYTES
        return self._roof(flops, nbytes) + 2 * self.launch

    def attention(self, tokens: int, sequences: int, context: float, kv_tokens: float) -> float:
        """Projections plus score/value products; decode reads the KV cache from HBM."""
        m, att = self.model, self.model.attention
        h = m.hidden_size
        p = att.params(h) / self.tp
        proj = self._roof(
            np.float64(2.0 * tokens * p), np.float64(p * self.wbytes + 4 * tokens * h * ACT_BYTES)
        )
        kv_split = self.tp if att.type == "gqa" and att.num_kv_heads >= self.tp else 1
        kv_bytes = kv_tokens * att.kv_elements_per_token() * ACT_BYTES / kv_split
        score = self._roof(
            np.float64(tokens * att.score_flops_per_token(context) / self.tp),
            np.float64(kv_bytes + 2 * tokens * h * ACT_BYTES),
        )
        return float(proj + score + 4 * self.launch)


class CalibratedCostModel(RooflineCostModel):
    """Expert FFN time from a measured table (:class:`moesim.calibration.fit.ExpertTimeTable`):
    ``T(v) = c + sum_i f(v_i)`` over the per-expert token vector; everything else is roofline.

    Args:
        hw: Hardware profile.
        model: Model description.
        dtype: Weight and compute dtype.
        tp: Tensor-parallel degree.
        table: The profile's table for the model's expert shape on one GPU (width / ``tp``)
            and ``dtype`` (:func:`cost_model` looks it up).
        cal: The profile's calibration (cited in ``source``).
    """

    def __init__(
        self,
        hw: HardwareProfile,
        model: ModelSpec,
        dtype: str,
        tp: int,
        table: ExpertCalibration,
        cal: Calibration,
    ) -> None:
        from moesim.calibration.fit import ExpertTimeTable

        super().__init__(hw, model, dtype, tp)
        self.table = ExpertTimeTable(
            np.asarray(table.tokens), np.asarray(table.seconds), table.overhead_s
        )
        self.source = (
            f"calibrated (experts: {cal.backend} on {cal.device}, {cal.measurements}; "
            "other kernels: roofline)"
        )
        self.sources["experts"] = f"calibrated: {cal.measurements}"

    def experts(self, slot_tokens: np.ndarray) -> np.ndarray:
        return self.table.predict(slot_tokens)


def cost_model(hw: HardwareProfile, model: ModelSpec, dtype: str, tp: int) -> CostModel:
    """The calibrated model where the profile has a table for this shape and dtype, else the
    roofline (whose ``source`` then says why)."""
    cal = hw.calibration
    if cal is None:
        return RooflineCostModel(hw, model, dtype, tp)
    width = model.moe.expert_intermediate_size // tp
    table = cal.table_for(model.hidden_size, width, model.moe.matrices, dtype)
    if table is not None:
        return CalibratedCostModel(hw, model, dtype, tp, table, cal)
    roof = RooflineCostModel(hw, model, dtype, tp)
    roof.source = (
        f"roofline (profile calibrated, but not for hidden {model.hidden_size}, "
        f"width {width}, {model.moe.matrices} matrices, {dtype})"
    )
    return roof
