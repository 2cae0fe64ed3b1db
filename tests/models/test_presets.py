"""Model presets reproduce the published parameter counts; HF configs import to the same spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moesim.errors import ConfigError
from moesim.models.hf_config import from_hf_config
from moesim.models.presets import load_preset, preset_names, resolve_model

# Total parameters as the model cards / papers state them (billions).
PUBLISHED_TOTAL_B = {
    "mixtral-8x7b": 46.7,  # Mistral AI, "Mixtral of Experts" (arXiv 2401.04088)
    "mixtral-8x22b": 141.0,  # Mistral AI announcement
    "deepseek-v3": 671.0,  # DeepSeek-V3 technical report (arXiv 2412.19437)
    "deepseek-v2-lite": 15.7,  # DeepSeek-V2 model card
    "deepseek-moe-16b": 16.4,  # DeepSeekMoE paper (arXiv 2401.06066)
    "qwen3-30b-a3b": 30.5,  # Qwen3 model card
    "olmoe-1b-7b": 6.9,  # OLMoE paper (arXiv 2409.02060)
    "gpt-oss-120b": 116.8,  # gpt-oss model card
    "dbrx": 132.0,  # Databricks DBRX announcement
    "grok-1": 314.0,  # xAI grok-1 release
    "qwen1.5-moe-a2.7b": 14.3,  # Qwen1.5-MoE model card
}
PUBLISHED_ACTIVE_B = {
    "mixtral-8x7b": 12.9,
    "deepseek-v3": 37.0,
    "qwen3-30b-a3b": 3.3,
    "olmoe-1b-7b": 1.3,
    "gpt-oss-120b": 5.1,
}


def test_all_twelve_presets_ship() -> None:
    assert len(preset_names()) == 12


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTAL_B))
def test_total_params_match_published(name: str) -> None:
    total = load_preset(name).total_params() / 1e9
    assert total == pytest.approx(PUBLISHED_TOTAL_B[name], rel=0.02)


@pytest.mark.parametrize("name", sorted(PUBLISHED_ACTIVE_B))
def test_active_params_match_published(name: str) -> None:
    # Active counts in model cards differ in what they include (embeddings): allow 15%.
    active = load_preset(name).active_params() / 1e9
    assert active == pytest.approx(PUBLISHED_ACTIVE_B[name], rel=0.15)


def test_every_preset_cites_its_config() -> None:
    for name in preset_names():
        assert load_preset(name).source.startswith("https://")


def test_moe_layer_layouts() -> None:
    assert load_preset("deepseek-v3").moe_layers[:2] == (3, 4)
    assert len(load_preset("deepseek-v3").moe_layers) == 58
    assert load_preset("switch-base-128").moe_layers[:3] == (1, 3, 5)


DEEPSEEK_V3_CONFIG = {
    "model_type": "deepseek_v3",
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "vocab_size": 129280,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "moe_layer_freq": 1,
    "n_group": 8,
    "topk_group": 4,
    "norm_topk_prob": True,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "tie_word_embeddings": False,
}
MIXTRAL_CONFIG = {
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
}
QWEN2_MOE_CONFIG = {
    "model_type": "qwen2_moe",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "decoder_sparse_step": 1,
    "vocab_size": 151936,
    "norm_topk_prob": False,
}


@pytest.mark.parametrize(
    ("cfg", "preset"),
    [
        (DEEPSEEK_V3_CONFIG, "deepseek-v3"),
        (MIXTRAL_CONFIG, "mixtral-8x7b"),
        (QWEN2_MOE_CONFIG, "qwen1.5-moe-a2.7b"),
    ],
)
def test_hf_config_imports_like_the_preset(cfg, preset, tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    spec, ref = resolve_model(str(path)), load_preset(preset)
    assert spec.moe == ref.moe
    assert spec.attention == ref.attention
    assert spec.total_params() == ref.total_params()


def test_hf_config_without_experts_is_rejected() -> None:
    with pytest.raises(ConfigError, match="not an MoE config"):
        from_hf_config({"hidden_size": 4096, "num_hidden_layers": 32}, "dense/config.json")
