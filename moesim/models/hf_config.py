"""Import a Hugging Face ``config.json`` into a :class:`ModelSpec`.

MoE families name the same facts differently; this module maps them:

============================  =========================================================
fact                          Hugging Face keys (first found wins)
============================  =========================================================
routed experts                num_local_experts, num_experts, n_routed_experts,
                              moe_num_experts, ffn_config.moe_num_experts
top-k                         num_experts_per_tok, experts_per_token, moe_top_k,
                              ffn_config.moe_top_k
expert FFN width              moe_intermediate_size, ffn_config.ffn_hidden_size,
                              intermediate_size (when there is no separate dense width)
shared experts                n_shared_experts (x moe_intermediate_size),
                              shared_expert_intermediate_size
dense leading layers          first_k_dense_replace
MoE every N layers            decoder_sparse_step, moe_layer_freq
group-limited routing         n_group, topk_group
top-k renormalisation         norm_topk_prob
============================  =========================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moesim.config.validation import validate
from moesim.errors import ConfigError, ConfigErrors
from moesim.models.spec import ModelSpec

EXPERT_KEYS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
    "ffn_config.moe_num_experts",
)


INT_KEYS = (
    *EXPERT_KEYS,
    "hidden_size", "d_model", "n_embd", "num_hidden_layers", "n_layers", "num_layers",
    "num_decoder_layers", "vocab_size", "num_attention_heads", "n_heads", "num_heads",
    "num_key_value_heads", "attn_config.kv_n_heads", "head_dim", "d_kv", "kv_lora_rank",
    "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "num_experts_per_tok", "experts_per_token", "moe_top_k", "ffn_config.moe_top_k",
    "moe_intermediate_size", "ffn_config.ffn_hidden_size", "intermediate_size", "d_ff",
    "n_shared_experts", "shared_expert_intermediate_size", "decoder_sparse_step",
    "encoder_sparse_step", "first_k_dense_replace", "n_group", "topk_group",
)  # fmt: skip
"""Keys read as whole numbers; each must be a JSON integer (or null) where present."""


def _check_types(cfg: Any, path: Path | str) -> None:
    """Raise for a config that is not an object, or a number given as text, float or bool."""
    if not isinstance(cfg, dict):
        raise ConfigError(path, "", f"expected a JSON object, got {type(cfg).__name__}")
    errors = []
    for key in INT_KEYS:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and (isinstance(node, bool) or not isinstance(node, int)):
            errors.append(ConfigError(path, key, f"expected a whole number, got {node!r:.60}"))
    if errors:
        raise ConfigErrors(errors)


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    return default


def _attention(cfg: dict[str, Any], hidden: int) -> dict[str, Any]:
    heads = _first(cfg, "num_attention_heads", "n_heads", "num_heads")
    if cfg.get("kv_lora_rank"):
        return {
            "type": "mla",
            "num_heads": heads,
            "q_lora_rank": cfg.get("q_lora_rank") or 0,
            "kv_lora_rank": cfg["kv_lora_rank"],
            "qk_nope_head_dim": cfg.get("qk_nope_head_dim", 0),
            "qk_rope_head_dim": cfg.get("qk_rope_head_dim", 0),
            "v_head_dim": cfg.get("v_head_dim", 0),
        }
    kv = _first(cfg, "num_key_value_heads", "attn_config.kv_n_heads", default=heads)
    head_dim = _first(cfg, "head_dim", "d_kv", default=hidden // heads if heads else 0)
    return {"type": "gqa", "num_heads": heads, "num_kv_heads": kv, "head_dim": head_dim}


def _moe(cfg: dict[str, Any]) -> dict[str, Any]:
    experts = _first(cfg, *EXPERT_KEYS)
    top_k = _first(
        cfg,
        "num_experts_per_tok",
        "experts_per_token",
        "moe_top_k",
        "ffn_config.moe_top_k",
        default=1,
    )
    width = _first(
        cfg, "moe_intermediate_size", "ffn_config.ffn_hidden_size", "intermediate_size", "d_ff"
    )
    n_shared = cfg.get("n_shared_experts") or 0
    shared = cfg.get("shared_expert_intermediate_size") or n_shared * (width or 0)
    step = _first(cfg, "decoder_sparse_step", "moe_layer_freq", "encoder_sparse_step", default=1)
    return {
        "num_experts": experts,
        "top_k": top_k,
        "expert_intermediate_size": width,
        "num_shared_experts": n_shared if n_shared else (1 if shared else 0),
        "shared_intermediate_size": shared,
        "first_k_dense": cfg.get("first_k_dense_replace") or 0,
        "layer_step": step if isinstance(step, int) and step > 0 else 1,
        "n_group": cfg.get("n_group") or 1,
        "topk_group": cfg.get("topk_group") or 1,
        "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
        "gated_ffn": cfg.get("model_type") != "switch_transformers",
    }


def from_hf_config(cfg: dict[str, Any], path: Path | str = "config.json") -> ModelSpec:
    """Build a :class:`ModelSpec` from a parsed Hugging Face ``config.json``.

    Raises:
        ConfigError / ConfigErrors: the config is not an MoE model, lacks a needed field, or
            gives a number as text.
    """
    _check_types(cfg, path)
    hidden = _first(cfg, "hidden_size", "d_model", "n_embd")
    if not _first(cfg, *EXPERT_KEYS):
        raise ConfigError(
            path,
            "num_local_experts",
            "not an MoE config: no expert count found "
            "(num_local_experts / num_experts / n_routed_experts)",
        )
    moe = _moe(cfg)
    has_dense = moe["first_k_dense"] > 0 or moe["layer_step"] > 1
    dense = _first(cfg, "intermediate_size", "d_ff", default=0) if has_dense else 0
    layers = _first(cfg, "num_hidden_layers", "n_layers", "num_layers")
    if cfg.get("model_type") == "switch_transformers":
        layers = (cfg.get("num_layers") or 0) + (cfg.get("num_decoder_layers") or 0)
    data = {
        "name": str(cfg.get("_name_or_path") or cfg.get("model_type") or Path(path).parent.name),
        "source": str(path),
        "hidden_size": hidden,
        "num_layers": layers,
        "vocab_size": cfg.get("vocab_size"),
        "dense_intermediate_size": dense,
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "attention": _attention(cfg, hidden or 0),
        "moe": moe,
    }
    return validate(ModelSpec, data, path)
