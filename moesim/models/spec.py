"""The architecture of an MoE language model, as the simulator needs it.

All sizes are element counts (not bytes); dtypes are chosen by the scenario's workload. Derived
quantities (parameter counts, FLOPs per token, KV-cache elements) live here so that the cost
model, the memory accounting and the CLI all compute them the same way.
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moesim.dtypes import ELEMENT_BYTES


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AttentionSpec(_Frozen):
    """Self-attention shape: grouped-query (``gqa``) or DeepSeek's multi-head latent (``mla``)."""

    type: Literal["gqa", "mla"] = Field("gqa", description="Attention family.")
    num_heads: int = Field(gt=0, le=2**14, description="Query heads.")
    num_kv_heads: int = Field(0, ge=0, le=2**20, description="Key/value heads (gqa); 0 for mla.")
    head_dim: int = Field(0, ge=0, le=2**20, description="Per-head size (gqa).")
    q_lora_rank: int = Field(0, ge=0, le=2**20, description="MLA query compression rank (0: none).")
    kv_lora_rank: int = Field(0, ge=0, le=2**20, description="MLA key/value compression rank.")
    qk_nope_head_dim: int = Field(0, ge=0, le=2**20, description="MLA non-rotary q/k head size.")
    qk_rope_head_dim: int = Field(0, ge=0, le=2**20, description="MLA rotary q/k head size.")
    v_head_dim: int = Field(0, ge=0, le=2**20, description="MLA value head size.")

    @model_validator(mode="after")
    def _check(self) -> AttentionSpec:
        if self.type == "gqa" and (self.num_kv_heads <= 0 or self.head_dim <= 0):
            raise ValueError("gqa attention needs num_kv_heads > 0 and head_dim > 0")
        if self.type == "mla" and (self.kv_lora_rank <= 0 or self.v_head_dim <= 0):
            raise ValueError("mla attention needs kv_lora_rank > 0 and v_head_dim > 0")
        return self

    def params(self, hidden: int) -> int:
        """Weight elements of one attention block (projections only)."""
        h, nh = hidden, self.num_heads
        if self.type == "gqa":
            q_out = nh * self.head_dim
            kv_out = 2 * self.num_kv_heads * self.head_dim
            return h * q_out + h * kv_out + q_out * h
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        q = h * self.q_lora_rank + self.q_lora_rank * nh * qk if self.q_lora_rank else h * nh * qk
        kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
        kv_b = self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv_a + kv_b + nh * self.v_head_dim * h

    def kv_elements_per_token(self) -> int:
        """KV-cache elements one token adds to one layer."""
        if self.type == "gqa":
            return 2 * self.num_kv_heads * self.head_dim
        return self.kv_lora_rank + self.qk_rope_head_dim

    def score_flops_per_token(self, context: float) -> float:
        """FLOPs of QK^T and AV for one query token attending to ``context`` keys."""
        if self.type == "gqa":
            return 4.0 * self.num_heads * self.head_dim * context
        qk = self.qk_nope_head_dim + self.qk_rope_head_dim
        return 2.0 * self.num_heads * (qk + self.v_head_dim) * context

    def decode_score_flops_per_token(self, context: float) -> float:
        """As :meth:`score_flops_per_token` for a decode step: MLA decodes absorbed, its
        queries scoring the cached latent (kv_lora_rank + rope values) and reading values
        from it (kv_lora_rank)."""
        if self.type == "gqa":
            return self.score_flops_per_token(context)
        latent = self.kv_lora_rank + self.qk_rope_head_dim
        return 2.0 * self.num_heads * (latent + self.kv_lora_rank) * context


class MoESpec(_Frozen):
    """The routed and shared experts of the MoE layers."""

    num_experts: int = Field(gt=0, le=32_767, description="Routed experts per MoE layer.")
    top_k: int = Field(gt=0, le=1024, description="Experts chosen per token.")
    expert_intermediate_size: int = Field(
        gt=0, le=2**20, description="FFN width of one routed expert."
    )
    num_shared_experts: int = Field(0, ge=0, le=32_767, description="Shared (always-on) experts.")
    shared_intermediate_size: int = Field(
        0, ge=0, le=2**22, description="Total FFN width of all shared experts together (0: none)."
    )
    first_k_dense: int = Field(
        0, ge=0, le=32_767, description="Leading layers that are dense, not MoE."
    )
    layer_step: int = Field(1, gt=0, le=32_767, description="Every layer_step-th layer is MoE.")
    n_group: int = Field(1, gt=0, le=32_767, description="Expert groups for group-limited routing.")
    topk_group: int = Field(1, gt=0, le=32_767, description="Groups a token may reach.")
    norm_topk_prob: bool = Field(False, description="Top-k gate weights renormalised.")
    gated_ffn: bool = Field(True, description="SwiGLU-style 3 matrices (else 2).")

    @model_validator(mode="after")
    def _check(self) -> MoESpec:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group {self.n_group} does not divide {self.num_experts}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group {self.topk_group} exceeds n_group {self.n_group}")
        return self

    @property
    def matrices(self) -> int:
        """Weight matrices per expert FFN (3 for gated SwiGLU, 2 otherwise)."""
        return 3 if self.gated_ffn else 2


def slots_per_rank(num_experts: int, redundant: int, ep: int) -> int:
    """Physical expert slots on each of ``ep`` ranks holding ``num_experts`` routed experts
    plus ``redundant`` replicas (the scenario checks that they split evenly)."""
    return (num_experts + redundant) // ep


class ModelSpec(_Frozen):
    """One MoE model architecture.

    Example:
        >>> from moesim.models.presets import load_preset
        >>> m = load_preset("mixtral-8x7b")
        >>> (m.num_layers, m.moe.num_experts, m.moe.top_k)
        (32, 8, 2)
    """

    name: str = Field(description="Model name.")
    source: str = Field(description="Where the figures come from (the public config).")
    hidden_size: int = Field(gt=0, le=2**20, description="Residual stream width.")
    num_layers: int = Field(gt=0, le=10_000, description="Transformer blocks.")
    vocab_size: int = Field(gt=0, le=2**25, description="Vocabulary size.")
    dense_intermediate_size: int = Field(
        0, ge=0, le=2**20, description="FFN width of dense layers."
    )
    tie_word_embeddings: bool = Field(False, description="Output head shares the embedding.")
    attention: AttentionSpec
    moe: MoESpec
    notes: str = Field("", description="How this description simplifies the real model.")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if not self.moe_layers:
            raise ValueError("the model has no MoE layer (check first_k_dense and layer_step)")
        if len(self.moe_layers) < self.num_layers and self.dense_intermediate_size <= 0:
            raise ValueError("dense layers present but dense_intermediate_size is 0")
        return self

    @cached_property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices (0-based) of the MoE layers."""
        m = self.moe
        return tuple(
            i
            for i in range(self.num_layers)
            if i >= m.first_k_dense and (i - m.first_k_dense + 1) % m.layer_step == 0
        )

    def is_moe_layer(self, layer: int) -> bool:
        """Whether ``layer`` (0-based) is an MoE layer."""
        return layer in self.moe_layers

    @property
    def expert_params(self) -> int:
        """Weight elements of one routed expert."""
        return self.moe.matrices * self.hidden_size * self.moe.expert_intermediate_size

    def expert_bytes(self, dtype: str, tp: int = 1) -> float:
        """Bytes of one routed expert's weights in ``dtype`` on one GPU (its 1/tp slice)."""
        return self.expert_params * ELEMENT_BYTES[dtype] / tp

    @property
    def shared_params(self) -> int:
        """Weight elements of all shared experts of one MoE layer."""
        return self.moe.matrices * self.hidden_size * self.moe.shared_intermediate_size

    @property
    def dense_ffn_params(self) -> int:
        """Weight elements of one dense FFN layer."""
        return self.moe.matrices * self.hidden_size * self.dense_intermediate_size

    @property
    def gate_params(self) -> int:
        """Router weight elements of one MoE layer."""
        return self.hidden_size * self.moe.num_experts

    @property
    def embedding_params(self) -> int:
        """Embedding plus output head elements."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def non_expert_params(self) -> int:
        """Elements of everything but routed experts: attention, gates, shared and dense FFNs."""
        n_moe = len(self.moe_layers)
        n_dense = self.num_layers - n_moe
        return (
            self.num_layers * self.attention.params(self.hidden_size)
            + n_moe * (self.gate_params + self.shared_params)
            + n_dense * self.dense_ffn_params
            + self.embedding_params
        )

    def total_params(self) -> int:
        """All weight elements."""
        return self.non_expert_params() + len(self.moe_layers) * self.moe.num_experts * (
            self.expert_params
        )

    def active_params(self) -> int:
        """Weight elements one token touches (top-k routed experts)."""
        return self.non_expert_params() + len(self.moe_layers) * self.moe.top_k * (
            self.expert_params
        )
