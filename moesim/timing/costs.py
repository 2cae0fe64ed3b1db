"""Compute costs of a layer, op by op: the kernels a real framework launches per layer.

:class:`OpCostModel` prices every kernel of a transformer layer on its own (forward, and in
training its backward), the way Megatron-Core with Transformer Engine (training) and SGLang /
vLLM with DeepGEMM, FlashMLA, FlashAttention-3 and DeepEP (inference) launch them:

- attention block: RMSNorm, FP8 activation quantisation (FP8 GEMMs), the projections (GQA/MHA:
  fused qkv; MLA: fused q_a + kv_a, their RMSNorms, q_b, and kv_b in prefill and training or the
  absorbed per-head products in decode), RoPE, the attention core (causal prefill and training
  by FLOPs at a length-dependent rate, decode by the KV-cache bytes read), the output
  projection and the residual add;
- MoE block: RMSNorm, router GEMM, score function and top-k (plus the auxiliary-loss kernels in
  training), FP8 quantisation of dispatched tokens, permute into the grouped layout, grouped
  expert GEMMs (gate+up, SwiGLU with the next GEMM's quantisation fused, down), unpermute with
  the combine weighting, shared experts (gate+up, SwiGLU, down) and the residual add;
- dense FFN layers: RMSNorm, gate+up, SwiGLU, down, residual add.

GEMMs are timed by :class:`moesim.timing.kernels.GemmModel` (tile and wave quantisation,
efficiency tables); memory-bound kernels cost their bytes over achieved HBM bandwidth
(``memory_efficiency``) plus one launch each, and no launch under CUDA graphs
(``workload.cuda_graphs``). In training, every GEMM's backward is an input-gradient GEMM
``(m, k, n)`` and a weight-gradient GEMM ``(k, n, m)`` (K-grouped for the experts), FP8 training
adds the quantised and transposed copies those read; memory-bound kernels move twice their
forward bytes; the attention core does 2.5x its forward FLOPs (FlashAttention's backward);
``workload.recompute`` re-runs forward ops in the backward pass.

Where the profile holds a ``moesim calibrate`` table for the expert shape, it replaces the
grouped expert GEMMs and SwiGLU. :attr:`OpCostModel.sources` names the table behind each op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from moesim.comm.alltoall import ALL_TO_ALL
from moesim.config.resolved import ResolvedScenario
from moesim.dtypes import token_bytes
from moesim.hardware.profile import Calibration, ExpertCalibration, HardwareProfile
from moesim.models.spec import ModelSpec
from moesim.timing.kernels import AttentionModel, GemmModel, operands, pad_rows

if TYPE_CHECKING:
    from moesim.calibration.fit import ExpertTimeTable

ACT_BYTES = 2.0  # activations are kept in bf16
FP32 = 4.0
ATTENTION_BACKWARD_FLOPS = 2.5  # FlashAttention backward: 5 matmuls to the forward's 2
Arr = npt.NDArray[np.float64]
OpTimes = dict[str, Arr]
"""Seconds of each op (arrays broadcast over the leading axes of the token counts)."""

SELECTIVE = ("attn_core", "q_b_proj", "kv_b_proj", "expert_act", "shared_act", "dense_act")
"""Ops that selective recompute re-runs in the backward pass (Megatron-Core's core-attention
and activation recompute, and the MLA up-projections)."""


@dataclass(frozen=True)
class CostOptions:
    """The scenario settings the op costs depend on.

    Attributes:
        dtype: GEMM weight and input dtype.
        attention_dtype: Dtype of the attention core.
        dispatch_dtype: Dtype of dispatched tokens (fp8: quantised before the dispatch).
        tp: Tensor-parallel degree.
        expert_layout: ``contiguous`` (normal all-to-all) or ``masked`` (low-latency decode).
        cuda_graphs: Kernels replayed from a CUDA graph pay no launch.
        recompute: ``none``, ``selective`` or ``full``.
        persistent_comm_sms: Communication kernels hold ``gpu.comm_sms`` for the whole step.
    """

    dtype: str = "bf16"
    attention_dtype: str = "bf16"
    dispatch_dtype: str = "bf16"
    tp: int = 1
    expert_layout: str = "contiguous"
    cuda_graphs: bool = False
    recompute: str = "none"
    persistent_comm_sms: bool = False


class _Ops:
    """Accumulates the op times of one block, forward or backward."""

    def __init__(self, cm: OpCostModel, backward: bool) -> None:
        self.cm, self.backward = cm, backward
        self.out: OpTimes = {}

    def add(self, name: str, seconds: npt.ArrayLike) -> None:
        t = np.asarray(seconds, dtype=np.float64)
        self.out[name] = self.out[name] + t if name in self.out else t

    def mem(self, name: str, nbytes: npt.ArrayLike, active: npt.ArrayLike = True) -> None:
        """A memory-bound kernel moving ``nbytes`` (two kernels, twice the bytes, backwards)."""
        passes = 2.0 if self.backward else 1.0
        b = np.asarray(nbytes, dtype=np.float64)
        self.add(name, np.where(active, passes * (b / self.cm.bw + self.cm.launch), 0.0))

    def gemm(
        self,
        name: str,
        m: npt.ArrayLike,
        n: float,
        k: float,
        dtype: str | None = None,
        layout: str = "dense",
        groups: npt.ArrayLike = 1,
        rows: npt.ArrayLike | None = None,
    ) -> None:
        """A GEMM of ``m`` tokens (``rows``: the padded rows, default ``m``) by ``(n, k)``."""
        cm, dt = self.cm, dtype or self.cm.opts.dtype
        m_arr = np.asarray(m, dtype=np.float64)
        r = m_arr if rows is None else np.asarray(rows, dtype=np.float64)
        active = m_arr > 0
        cm.sources.setdefault(name, cm.gemm.source(dt, layout))
        if not self.backward:
            self.add(
                name, np.where(active, cm.gemm.time(r, n, k, dt, layout, groups) + cm.launch, 0)
            )
            return
        g = np.maximum(np.asarray(groups, dtype=np.float64), 1.0)
        dgrad = cm.gemm.time(r, k, n, dt, layout, groups)
        wgrad = cm.gemm.time(g * k, n, r / g, dt, layout, groups)
        self.add(name, np.where(active, dgrad + wgrad + 2 * cm.launch, 0.0))
        if dt == "fp8":  # dY quantised, X and dY quantised again transposed for the wgrad
            q = operands("fp8").inputs
            nbytes = m_arr * (n * (ACT_BYTES + q) + (k + n) * (ACT_BYTES + q))
            self.add("fp8_quant_bwd", np.where(active, nbytes / cm.bw + 3 * cm.launch, 0.0))


class OpCostModel:
    """Op-level compute costs of one GPU (see the module docstring).

    Args:
        hw: Hardware profile.
        model: Model description.
        opts: The scenario's settings.
    """

    def __init__(self, hw: HardwareProfile, model: ModelSpec, opts: CostOptions) -> None:
        self.hw, self.model, self.opts = hw, model, opts
        held = hw.gpu.comm_sms if opts.persistent_comm_sms else 0
        self.sms = hw.gpu.sm_count - held
        self.gemm = GemmModel(hw, self.sms)
        self.attn = AttentionModel(hw, model.attention.type, self.sms / hw.gpu.sm_count)
        self.bw = hw.gpu.hbm_bandwidth_gb_per_s * 1e9 * hw.gpu.memory_efficiency
        self.launch = 0.0 if opts.cuda_graphs else hw.gpu.kernel_launch_s
        mem = f"HBM {hw.gpu.hbm_bandwidth_gb_per_s:g} GB/s x memory_efficiency"
        self.memory_source = f"{mem} {hw.gpu.memory_efficiency:g}"
        self.sources: dict[str, str] = {}
        self.expert_table: ExpertCalibration | None = None
        self.expert_time: ExpertTimeTable | None = None  # the table's fit, built once
        self.source = "op-level (GEMM and attention tables of the profile, else roofline)"

    # ---- helpers -----------------------------------------------------------------------
    @property
    def _q(self) -> float:
        """Bytes per element of a GEMM input in the GEMM dtype."""
        return operands(self.opts.dtype).inputs

    def _quant(self, ops: _Ops, name: str, elements: npt.ArrayLike) -> None:
        """Per-token FP8 quantisation of a GEMM input of ``elements`` values."""
        if self.opts.dtype == "fp8":
            ops.mem(name, np.asarray(elements, dtype=np.float64) * (ACT_BYTES + self._q))

    def _blocks(self, fn: Callable[..., None], backward: bool, *args: object) -> OpTimes:
        """Run a block builder forward, or backward with the forward ops that
        ``recompute`` re-runs (``selective``: :data:`SELECTIVE`; ``full``: all)."""
        ops = _Ops(self, backward)
        fn(ops, *args)
        rc = self.opts.recompute
        if backward and rc != "none":
            fwd = _Ops(self, False)
            fn(fwd, *args)
            for name, sec in fwd.out.items():
                if rc == "full" or name in SELECTIVE:
                    ops.add("recompute", sec)
        for name in ops.out:
            self.sources.setdefault(name, self.memory_source)
        return ops.out

    # ---- attention ---------------------------------------------------------------------
    def attention(
        self, tokens: float, context: float, kv_tokens: float, decode: bool, seq_len: float,
        backward: bool = False,
    ) -> OpTimes:  # fmt: skip
        """The attention block of one layer for ``tokens`` queries over ``context`` keys each
        (``kv_tokens`` cached keys read in decode; ``seq_len``: prefill sequence length)."""
        return self._blocks(self._attention, backward, tokens, context, kv_tokens, decode, seq_len)

    def _attention(
        self, ops: _Ops, t: float, context: float, kv_tokens: float, decode: bool, seq_len: float
    ) -> None:
        m, att, tp = self.model, self.model.attention, self.opts.tp
        h, nh = m.hidden_size, att.num_heads / tp
        ops.mem("attn_norm", 2 * t * h * ACT_BYTES)
        self._quant(ops, "attn_quant", t * h)
        if att.type == "gqa":
            kv_heads = max(att.num_kv_heads / tp, 1.0)
            ops.gemm("qkv_proj", t, (nh + 2 * kv_heads) * att.head_dim, h)
            ops.mem("rope", 2 * t * (nh + kv_heads) * att.head_dim * ACT_BYTES)
            out_k = nh * att.head_dim
            flops = t * att.score_flops_per_token(context) / tp
            kv_split = tp if att.num_kv_heads >= tp else 1
        else:
            qk = att.qk_nope_head_dim + att.qk_rope_head_dim
            lat = att.kv_lora_rank + att.qk_rope_head_dim
            ops.gemm("qkv_a_proj", t, att.q_lora_rank + lat, h)
            ops.mem("qkv_a_norm", 2 * t * (att.q_lora_rank + att.kv_lora_rank) * ACT_BYTES)
            if att.q_lora_rank:
                self._quant(ops, "q_b_quant", t * att.q_lora_rank)
                ops.gemm("q_b_proj", t, nh * qk, att.q_lora_rank)
            if decode:  # absorbed: per-head products into and out of the latent space
                heads = np.float64(nh)
                bt = "bf16"
                ops.gemm("q_absorb", t, att.kv_lora_rank, att.qk_nope_head_dim, bt, "dense", heads,
                         heads * t)  # fmt: skip
                flops = t * att.decode_score_flops_per_token(context) / tp
            else:
                self._quant(ops, "kv_b_quant", t * att.kv_lora_rank)
                ops.gemm("kv_b_proj", t, nh * (att.qk_nope_head_dim + att.v_head_dim),
                         att.kv_lora_rank)  # fmt: skip
                flops = t * att.score_flops_per_token(context) / tp
            ops.mem("rope", 2 * t * (nh + 1) * att.qk_rope_head_dim * ACT_BYTES)
            out_k = nh * att.v_head_dim
            kv_split = 1
        adt = self.opts.attention_dtype
        if decode:
            kv_bytes = kv_tokens * att.kv_elements_per_token() * ACT_BYTES / kv_split
            core = self.attn.decode_time(flops, kv_bytes, adt)
            self.sources.setdefault("attn_core", self.attn.source("decode"))
        else:
            core = self.attn.prefill_time(flops, seq_len, adt)
            self.sources.setdefault("attn_core", self.attn.source("prefill"))
        if ops.backward and not decode:
            core *= ATTENTION_BACKWARD_FLOPS
        ops.add("attn_core", core + (2 if ops.backward else 1) * self.launch)
        if att.type == "mla" and decode:
            heads = np.float64(nh)
            ops.gemm("out_absorb", t, att.v_head_dim, att.kv_lora_rank, "bf16", "dense", heads,
                     heads * t)  # fmt: skip
        self._quant(ops, "o_quant", t * out_k)
        ops.gemm("o_proj", t, h, out_k)
        ops.mem("attn_residual", 3 * t * h * ACT_BYTES)

    # ---- MoE block ---------------------------------------------------------------------
    def router(self, tokens: float, train: bool, backward: bool = False) -> OpTimes:
        """RMSNorm, router GEMM, scores and top-k, dispatch quantisation, residual add."""
        return self._blocks(self._router, backward, tokens, train)

    def _router(self, ops: _Ops, t: float, train: bool) -> None:
        m = self.model
        h, e = m.hidden_size, m.moe.num_experts
        ops.mem("ffn_norm", 2 * t * h * ACT_BYTES)
        ops.gemm("router", t, e, h, "bf16")
        ops.mem("topk", t * e * FP32 * 2 + t * m.moe.top_k * 8)
        if train:
            ops.mem("aux_loss", 2 * t * e * FP32)
        if self.opts.dispatch_dtype == "fp8":
            ops.mem("dispatch_quant", t * (h * ACT_BYTES + token_bytes(h, "fp8")))
        ops.mem("moe_residual", 3 * t * h * ACT_BYTES)

    def experts(self, slot_tokens: np.ndarray, backward: bool = False) -> OpTimes:
        """``[..., slots]`` tokens per local expert slot -> each op's ``[...]`` seconds."""
        return self._blocks(self._experts, backward, slot_tokens)

    def _experts(self, ops: _Ops, slot_tokens: np.ndarray) -> None:
        m, tp = self.model, self.opts.tp
        h, w = m.hidden_size, m.moe.expert_intermediate_size / tp
        v = slot_tokens.astype(np.float64)
        rows = v.sum(axis=-1)
        groups = (v > 0).sum(axis=-1).astype(np.float64)
        busy = rows > 0
        tok = token_bytes(h, self.opts.dispatch_dtype)
        ops.mem("permute", 2 * rows * tok, busy)
        if self.expert_time is not None:
            self._calibrated(ops, v)
        else:
            padded = pad_rows(v, self.gemm.roof.block_m).sum(axis=-1)
            lay = self.opts.expert_layout
            ops.gemm("expert_gate_up", rows, (m.moe.matrices - 1) * w, h, None, lay, groups,
                     padded)  # fmt: skip
            act_in = (m.moe.matrices - 1) * w * ACT_BYTES
            ops.mem("expert_act", rows * (act_in + w * self._q), busy)
            ops.gemm("expert_down", rows, h, w, None, lay, groups, padded)
        ops.mem("unpermute", 2 * rows * h * ACT_BYTES, busy)

    def _calibrated(self, ops: _Ops, v: np.ndarray) -> None:
        assert self.expert_time is not None
        # the table times forward passes; the backward is priced at twice that
        ops.add("experts_calibrated", self.expert_time.predict(v) * (2.0 if ops.backward else 1.0))

    def ffn(self, tokens: float, width: float, name: str, backward: bool = False) -> OpTimes:
        """A dense FFN of total ``width`` (shared experts, or a dense layer with its norm and
        residual add: ``name`` ``dense``)."""
        return self._blocks(self._ffn, backward, tokens, width, name)

    def _ffn(self, ops: _Ops, t: float, width: float, name: str) -> None:
        m = self.model
        h, w = m.hidden_size, width / self.opts.tp
        if name == "dense":
            ops.mem("ffn_norm", 2 * t * h * ACT_BYTES)
        self._quant(ops, f"{name}_quant", t * h)
        ops.gemm(f"{name}_gate_up", t, (m.moe.matrices - 1) * w, h)
        ops.mem(f"{name}_act", t * ((m.moe.matrices - 1) * w * ACT_BYTES + w * self._q))
        ops.gemm(f"{name}_down", t, h, w)
        if name == "dense":
            ops.mem("ffn_residual", 3 * t * h * ACT_BYTES)


def total(ops: OpTimes) -> Arr:
    """Seconds of all ops together."""
    return np.asarray(sum(ops.values(), np.float64(0.0)), dtype=np.float64)


def cost_model(
    hw: HardwareProfile, model: ModelSpec, dtype: str, tp: int, opts: CostOptions | None = None
) -> OpCostModel:
    """The op-level model for ``dtype`` and ``tp``; with the profile's ``moesim calibrate``
    table for this expert shape and dtype where it has one."""
    from dataclasses import replace

    o = replace(opts or CostOptions(), dtype=dtype, tp=tp)
    cm = OpCostModel(hw, model, o)
    cal: Calibration | None = hw.calibration
    width = model.moe.expert_intermediate_size // tp
    if cal is not None:
        table = cal.table_for(model.hidden_size, width, model.moe.matrices, dtype)
        if table is not None:
            from moesim.calibration.fit import ExpertTimeTable

            cm.expert_table = table
            cm.expert_time = ExpertTimeTable(
                np.asarray(table.tokens), np.asarray(table.seconds), table.overhead_s
            )
            where = f"{cal.backend} on {cal.device}, {cal.measurements}"
            cm.sources["experts_calibrated"] = f"calibrated: {where}"
            cm.source = f"op-level; experts calibrated ({where})"
        else:
            cm.source = (
                f"op-level (profile calibrated, but not for hidden {model.hidden_size}, "
                f"width {width}, {model.moe.matrices} matrices, {dtype})"
            )
    return cm


def scenario_costs(r: ResolvedScenario) -> OpCostModel:
    """The cost model of a resolved scenario (its dtype, tp and cost settings)."""
    s = r.scenario
    return cost_model(r.hardware, r.model, s.workload.dtype, s.parallelism.tp, cost_options(r))


def cost_options(r: ResolvedScenario) -> CostOptions:
    """The cost settings of a resolved scenario."""
    s = r.scenario
    w, pol = s.workload, s.policies
    a2a = ALL_TO_ALL.get(pol.all_to_all.type)
    return CostOptions(
        dtype=w.dtype,
        attention_dtype=w.attention_dtype,
        dispatch_dtype=w.dispatch_dtype,
        tp=s.parallelism.tp,
        expert_layout="masked" if pol.all_to_all.type == "low_latency" else "contiguous",
        cuda_graphs=w.cuda_graphs,
        recompute=w.recompute,
        persistent_comm_sms=pol.overlap.comm_sms == "persistent" and a2a.holds_sms,
    )


def layer_blocks(
    cm: OpCostModel,
    tokens: float,
    context: float,
    kv_tokens: float,
    decode: bool,
    seq_len: float,
    train: bool,
    slot_tokens: np.ndarray,
    backward: bool = False,
) -> dict[str, OpTimes]:
    """Op times of each block of a layer on one GPU: ``attention``, ``router`` and ``experts``
    (``slot_tokens``: ``[..., slots]`` tokens per local expert), and ``shared`` and ``dense``
    where the model has shared experts and dense layers."""
    m = cm.model
    blocks = {
        "attention": cm.attention(tokens, context, kv_tokens, decode, seq_len, backward),
        "router": cm.router(tokens, train, backward),
        "experts": cm.experts(slot_tokens, backward),
    }
    if m.shared_params:
        blocks["shared"] = cm.ffn(tokens, m.moe.shared_intermediate_size, "shared", backward)
    if len(m.moe_layers) < m.num_layers:
        blocks["dense"] = cm.ffn(tokens, m.dense_intermediate_size, "dense", backward)
    return blocks


def layer_ops(
    r: ResolvedScenario, backward: bool = False, cm: OpCostModel | None = None
) -> dict[str, dict[str, float]]:
    """Seconds of each op of one layer on one GPU, by block (``attention``, ``router``,
    ``experts``, ``shared``, ``dense``), for the scenario's first step with evenly spread
    expert loads (each local expert gets ``tokens * ep * top_k / experts`` tokens).

    This is the per-op breakdown ``moesim ops`` prints; a run's ``ops_s`` sums the same ops
    over its layers with the routed loads. ``cm``: the scenario's cost model (its ``sources``
    then name the table behind each op).
    """
    s, m = r.scenario, r.model
    w = s.workload
    cm = cm or scenario_costs(r)
    ep = s.parallelism.ep
    seqs = max(w.batch_size // ep, 1)
    decode, train = w.mode == "decode", w.mode == "train"
    tokens = float(seqs if decode else seqs * w.seq_len)
    context = float(w.context_len) if decode else w.seq_len / 2
    kv_tokens = seqs * float(w.context_len) if decode else 0.0
    per_expert = tokens * ep * m.moe.top_k / m.moe.num_experts
    slots = np.full(max(m.moe.num_experts // ep, 1), per_expert)
    blocks = layer_blocks(cm, tokens, context, kv_tokens, decode, w.seq_len, train, slots, backward)
    return {b: {op: float(t) for op, t in ops.items()} for b, ops in blocks.items()}


def projection_shapes(model: ModelSpec, tp: int) -> list[tuple[int, int]]:
    """``(n, k)`` of every projection the op-level model prices, and their transposes."""
    m, att = model, model.attention
    h, nh = m.hidden_size, max(att.num_heads // tp, 1)
    shapes: list[tuple[int, int]] = []
    if att.type == "gqa":
        kv = max(att.num_kv_heads // tp, 1)
        shapes += [((nh + 2 * kv) * att.head_dim, h), (h, nh * att.head_dim)]
    else:
        qk = att.qk_nope_head_dim + att.qk_rope_head_dim
        lat = att.kv_lora_rank + att.qk_rope_head_dim
        shapes += [(att.q_lora_rank + lat, h), (h, nh * att.v_head_dim)]
        shapes += [(nh * (att.qk_nope_head_dim + att.v_head_dim), att.kv_lora_rank)]
        if att.q_lora_rank:
            shapes.append((nh * qk, att.q_lora_rank))
    mats = m.moe.matrices - 1
    for width in (m.moe.expert_intermediate_size, m.moe.shared_intermediate_size,
                  m.dense_intermediate_size):  # fmt: skip
        w = width // tp
        if w:
            shapes += [(mats * w, h), (h, w)]
    shapes.append((m.moe.num_experts, h))
    return sorted(set(shapes) | {(k, n) for n, k in shapes})
