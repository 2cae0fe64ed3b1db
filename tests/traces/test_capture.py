"""Capture from PyTorch: every supported family on a tiny random config, on CPU.

The captured top-k must equal what the model's own forward hands to its experts (read by a
separate hook on the experts module), so the test fails if capture misreads a router.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)
from typer.testing import CliRunner

from moesim.cli import app
from moesim.traces import capture, read_trace
from moesim.traces.format import TraceError
from moesim.traces.recorder import RouterOutput, cache_offset

COMMON = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
MLA = {
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "num_key_value_heads": 4,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "first_k_dense_replace": 0,
    "n_routed_experts": 8,
    "n_group": 2,
    "topk_group": 1,
}
FAMILIES = {
    "mixtral": {"num_local_experts": 8},
    "qwen2_moe": {
        "num_experts": 8,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
    },
    "qwen3_moe": {"num_experts": 8, "moe_intermediate_size": 32, "head_dim": 8},
    "olmoe": {"num_experts": 8},
    "deepseek_v2": {**MLA, "q_lora_rank": None, "topk_method": "group_limited_greedy"},
    "deepseek_v3": {**MLA, "q_lora_rank": 16},
    "gpt_oss": {
        "num_local_experts": 8,
        "head_dim": 8,
        "layer_types": ["full_attention", "sliding_attention"],
    },
    "granitemoe": {"num_local_experts": 8},
}


def tiny(family: str) -> torch.nn.Module:
    cfg = AutoConfig.for_model(family, **{**COMMON, "num_experts_per_tok": 2, **FAMILIES[family]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    for p in model.parameters():  # random routers (some families initialise them to zero)
        torch.nn.init.normal_(p, std=0.5) if p.dim() > 1 else None
    return model


def experts_inputs(model: torch.nn.Module) -> list[torch.Tensor]:
    """What the model's forward passes to its experts modules (their index argument)."""
    seen: list[torch.Tensor] = []
    for name, mod in model.named_modules():
        if name.endswith("experts") and not name.endswith("shared_experts"):
            mod.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().clone()))
    return seen


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_capture_equals_the_models_own_routing(family: str) -> None:
    model = tiny(family)
    seen = experts_inputs(model)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), capture(model) as rec:
        model(input_ids=ids)
    trace = rec.trace()
    assert trace.meta.num_experts == 8 and trace.meta.top_k == 2 and trace.meta.num_layers == 2
    reference = np.concatenate([s.numpy().reshape(-1, 2) for s in seen])
    assert np.array_equal(trace.experts, reference)
    assert len(np.unique(trace.experts)) > 2  # routing is not degenerate
    assert trace.weights is not None and trace.rows == 2 * 30
    assert list(trace.seq[:10]) == [0] * 10 and list(trace.pos[:10]) == list(range(10))


def test_switch_transformers_records_choice_and_drop() -> None:
    cfg = SwitchTransformersConfig(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        num_experts=4,
        expert_capacity=3,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
    )
    torch.manual_seed(0)
    model = SwitchTransformersForConditionalGeneration(cfg).eval()
    seen = experts_inputs(model)
    with torch.no_grad(), capture(model) as rec:
        model(input_ids=torch.randint(0, 64, (2, 12)), decoder_input_ids=torch.zeros(2, 5).long())
    trace = rec.trace()
    mask = np.concatenate([s.reshape(-1, 4).numpy() for s in seen])
    kept = mask.sum(axis=1) > 0
    assert trace.meta.top_k == 1 and trace.meta.num_layers == 4
    assert trace.dropped is not None and trace.dropped[:, 0].sum() > 0  # capacity 3 overflows
    assert np.array_equal(~kept, trace.dropped[:, 0])
    assert np.array_equal(mask[kept].argmax(axis=1), trace.experts[kept, 0])


def test_generation_records_positions_and_decode_steps() -> None:
    model = tiny("mixtral")
    with torch.no_grad(), capture(model) as rec:
        model.generate(
            torch.randint(0, 64, (2, 6)),
            attention_mask=torch.ones(2, 6).long(),
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
        )
    layer0 = rec.trace().select(rec.trace().layer == 0)
    assert list(layer0.step) == [0] * 12 + [1, 1, 2, 2, 3, 3]
    assert list(layer0.pos[12:]) == [6, 6, 7, 7, 8, 8]  # KV-cache positions, same sequences
    assert list(layer0.seq[12:]) == [0, 1] * 3


def test_padding_is_not_recorded() -> None:
    model = tiny("olmoe")
    mask = torch.ones(2, 8).long()
    mask[1, :3] = 0
    with torch.no_grad(), capture(model) as rec:
        model(input_ids=torch.randint(0, 64, (2, 8)), attention_mask=mask)
    layer0 = rec.trace().select(rec.trace().layer == 0)
    assert layer0.rows == 13 and list(layer0.pos[8:]) == [3, 4, 5, 6, 7]


def test_training_steps_are_recorded_manually() -> None:
    model = tiny("qwen3_moe").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with capture(model, steps="manual", logits=True) as rec:
        for step in range(3):
            rec.step = step * 10
            ids = torch.randint(0, 64, (2, 8))
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    trace = rec.trace()
    assert sorted(set(trace.step)) == [0, 10, 20]
    assert trace.logits is not None and trace.logits.shape == (trace.rows, 8)
    # the router takes the top-2 of softmax(logits): the two largest logits, in order
    assert np.array_equal(np.argsort(-trace.logits, axis=1, kind="stable")[:, :2], trace.experts)


class LegacyMoeBlock(torch.nn.Module):
    """A transformers-4.x-style block: ``gate`` is a plain linear layer returning logits."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(16, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate(x).sum(-1, keepdim=True)


class LegacyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = type(
            "C", (), {"num_local_experts": 6, "num_experts_per_tok": 2, "norm_topk_prob": True}
        )()
        self.embed = torch.nn.Embedding(10, 16)
        self.layers = torch.nn.ModuleList([LegacyMoeBlock(), LegacyMoeBlock()])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


def test_transformers_4_linear_gate() -> None:
    torch.manual_seed(0)
    model = LegacyModel()
    ids = torch.randint(0, 10, (2, 5))
    with torch.no_grad(), capture(model) as rec:
        model(ids)
    trace = rec.trace()
    assert trace.meta.num_layers == 2 and trace.meta.top_k == 2
    logits = model.layers[0].gate(model.embed(ids)).reshape(-1, 6)
    expect = torch.topk(torch.softmax(logits, -1), 2).indices.numpy()
    assert np.array_equal(trace.experts[:10], expect)
    assert trace.weights[:, :].sum(axis=1) == pytest.approx(1.0, abs=1e-6)


def test_custom_router_with_interpret() -> None:
    model = LegacyModel()
    routers = [("only", model.layers[1].gate)]

    def interpret(out: torch.Tensor, module: torch.nn.Module, top_k: int) -> RouterOutput:
        idx = out.reshape(-1, 6).argmax(-1, keepdim=True).numpy().astype(np.int16)
        return RouterOutput(experts=idx, weights=None, dropped=None, logits=None)

    with torch.no_grad(), capture(model, routers=routers, interpret=interpret) as rec:
        model(torch.randint(0, 10, (1, 4)))
    assert rec.trace().meta.top_k == 1 and rec.trace().rows == 4


def test_no_router_is_a_clear_error() -> None:
    with pytest.raises(TraceError, match="no MoE router found in Linear"):
        capture(torch.nn.Linear(2, 2)).__enter__()


def test_cli_capture_on_a_local_config(tmp_path: Path) -> None:
    model = tiny("mixtral")
    model.config.save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("Mixture of experts routes every token to a few experts. " * 40)
    out = tmp_path / "t.parquet"
    res = CliRunner().invoke(
        app,
        [
            "trace",
            "capture",
            "--model",
            str(tmp_path / "model"),
            "--text",
            str(text),
            "--out",
            str(out),
            "--seq-len",
            "64",
            "--max-tokens",
            "1024",
        ],
    )
    assert res.exit_code == 0, res.output
    trace = read_trace(out)
    assert trace.meta.source == "capture" and trace.meta.capture["tokenizer"] == "utf-8 bytes"
    assert trace.rows == 2 * 1024 and trace.seq.max() == 15


def test_the_transformers_under_test_is_the_one_asked_for() -> None:
    """``make test`` reruns this file on the oldest transformers allowed (an overlay)."""
    import transformers

    wanted = os.environ.get("MOESIM_EXPECT_TRANSFORMERS")
    if wanted is None:
        wanted = importlib.metadata.version("transformers")
    assert transformers.__version__ == wanted


class _Cache:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_seq_length(self) -> int:
        return self.n


@pytest.mark.parametrize(
    "kwargs, length, mask, offset",
    [
        ({"cache_position": torch.tensor([5])}, 1, None, 5),  # 4.36 to 5.23
        ({"past_key_values": _Cache(7)}, 1, None, 7),
        ({"cache": _Cache(9)}, 1, None, 9),  # 5.24
        ({}, 1, torch.ones(2, 12), 11),  # the mask covers the cached columns
        ({"position_ids": torch.tensor([[3], [6]])}, 1, None, 6),  # left padding lowers row 0
        ({"position_ids": torch.arange(4)[None]}, 4, torch.ones(1, 4), 0),
        ({}, 3, None, 0),
    ],
)
def test_cache_offset_reads_every_form(
    kwargs: dict, length: int, mask: torch.Tensor | None, offset: int
) -> None:
    assert cache_offset(kwargs, length, mask) == offset
