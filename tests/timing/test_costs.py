"""The op-level cost model: each op on a hand-computed case, the GEMM tables exact at their
points and monotone between them, backward shapes, launches, SMs held by communication."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moesim.hardware.catalog import load_profile
from moesim.hardware.profile import HardwareProfile
from moesim.models.presets import load_preset
from moesim.timing.costs import CostOptions, OpCostModel, cost_model, total
from moesim.timing.kernels import GemmModel


def _bare(name: str) -> HardwareProfile:
    """A shipped profile without kernel tables (flat efficiencies only)."""
    hw = load_profile(name)
    return hw.model_copy(
        update={"kernels": hw.kernels.model_copy(update={"gemm": [], "attention": []})}
    )


@pytest.mark.parametrize("layout", ["dense", "contiguous", "masked"])
def test_gemm_tables_are_exact_at_their_points(layout: str) -> None:
    hw = load_profile("h800")
    gm = GemmModel(hw, hw.gpu.sm_count)
    table = next(t for t in hw.kernels.gemm if t.layout == layout and t.dtype == "fp8")
    for g, m, n, k, tflops in table.points:
        rows = g * m if layout == "dense" else g * math.ceil(m / 128) * 128
        got = float(gm.time(rows, n, k, "fp8", layout, g))
        assert got == pytest.approx(2 * g * m * n * k / (tflops * 1e12), rel=1e-9)


def test_gemm_time_is_monotone_between_points() -> None:
    """Within 0.1%: the efficiency is interpolated smoothly while the quantised roofline
    steps, so inside one wave a few more rows can cost a hair less (at most 0.09% here)."""
    hw = load_profile("h800")
    gm = GemmModel(hw, hw.gpu.sm_count)
    for n, k in [(4096, 7168), (7168, 2048), (24576, 1536), (2112, 7168), (32768, 512)]:
        m = np.arange(1, 20_000)
        t = gm.time(m, n, k, "fp8")
        assert (np.diff(t) / t[1:] >= -1e-3).all(), (n, k)
        assert t[-1] > 10 * t[0]
    # off the table's shapes the nearest shapes' efficiencies are blended
    t = gm.time(np.arange(64, 4097, 64), 5000, 6000, "fp8")
    assert (t > 0).all()


def test_flat_gemm_is_the_quantised_roofline_by_hand() -> None:
    hw = _bare("h100-sxm")
    gm = GemmModel(hw, hw.gpu.sm_count)
    m, n, k = 4096, 4096, 4096
    tiles = 32 * 32  # 128 x 128 tiles
    waves = math.ceil(tiles / 132)
    compute = waves * 2 * 128 * 128 * k / (989.4e12 / 132)
    memory = (n * k + m * k + m * n) * 2 / 3350e9
    want = max(compute / hw.gpu.matmul_efficiency, memory / hw.gpu.memory_efficiency)
    assert float(gm.time(m, n, k, "bf16")) == pytest.approx(want, rel=1e-12)
    # a GEMM whose tiles fill fewer SMs splits K: one 128-row tile, K = 4096 -> 32 splits
    one = float(gm.time(1, 128, 4096, "bf16"))
    split_compute = 2 * 128 * 128 * 128 / (989.4e12 / 132)
    split_memory = (128 * 4096 + 4096 + 128) * 2 / 3350e9
    assert one == pytest.approx(
        max(split_compute / hw.gpu.matmul_efficiency, split_memory / hw.gpu.memory_efficiency)
    )


def test_memory_bound_ops_by_hand_and_cuda_graphs_drop_launches() -> None:
    hw, model = _bare("h100-sxm"), load_preset("mixtral-8x7b")
    eager = OpCostModel(hw, model, CostOptions())
    graphs = OpCostModel(hw, model, CostOptions(cuda_graphs=True))
    t = 64.0
    bw = 3350e9 * hw.gpu.memory_efficiency
    norm = 2 * t * 4096 * 2 / bw
    a = eager.attention(t, 100.0, t * 100, True, 0)
    b = graphs.attention(t, 100.0, t * 100, True, 0)
    assert float(a["attn_norm"]) == pytest.approx(norm + hw.gpu.kernel_launch_s)
    assert float(b["attn_norm"]) == pytest.approx(norm)
    assert float(a["attn_residual"]) == pytest.approx(3 * t * 4096 * 2 / bw + 4e-6)
    # decode attention core reads the KV cache: 8 kv heads x 128 x 2 (k, v) x bf16 per token
    kv = t * 100 * 2 * 8 * 128 * 2
    assert float(b["attn_core"]) >= kv / bw * (1 - 1e-9)


def test_backward_gemms_have_their_own_shapes() -> None:
    hw, model = _bare("h100-sxm"), load_preset("mixtral-8x7b")
    cm = OpCostModel(hw, model, CostOptions(cuda_graphs=True))
    gm = cm.gemm
    t = 2048.0
    fwd = cm.router(t, train=True)
    bwd = cm.router(t, train=True, backward=True)
    e, h = 8, 4096
    assert float(fwd["router"]) == pytest.approx(float(gm.time(t, e, h, "bf16")))
    want = float(gm.time(t, h, e, "bf16")) + float(gm.time(h, e, t, "bf16"))
    assert float(bwd["router"]) == pytest.approx(want)  # dgrad (m, k, n) + wgrad (k, n, m)
    # memory-bound kernels move twice their bytes backwards
    assert float(bwd["topk"]) == pytest.approx(2 * float(fwd["topk"]))
    # grouped expert weight gradients are K-grouped: 2 groups of 4096 rows each
    v = np.array([[4096.0, 4096.0, 0.0, 0.0]])
    eb = cm.experts(v, backward=True)["expert_down"]
    w = 14336
    dgrad = gm.time(8192, w, h, "bf16", "contiguous", 2)
    wgrad = gm.time(2 * w, h, 4096, "bf16", "contiguous", 2)
    assert float(eb[0]) == pytest.approx(float(dgrad + wgrad))


def test_fp8_training_adds_transposed_quantised_copies_and_recompute_reruns_ops() -> None:
    hw, model = load_profile("h800"), load_preset("deepseek-v3")
    plain = OpCostModel(hw, model, CostOptions(dtype="fp8"))
    sel = OpCostModel(hw, model, CostOptions(dtype="fp8", recompute="selective"))
    full = OpCostModel(hw, model, CostOptions(dtype="fp8", recompute="full"))
    args = (4096.0, 2048.0, 0.0, False, 4096)
    b = plain.attention(*args, backward=True)
    assert float(b["fp8_quant_bwd"]) > 0
    assert "recompute" not in b
    fwd = plain.attention(*args)
    rs = float(sel.attention(*args, backward=True)["recompute"])
    rf = float(full.attention(*args, backward=True)["recompute"])
    assert rs == pytest.approx(float(fwd["attn_core"] + fwd["q_b_proj"] + fwd["kv_b_proj"]))
    assert rf == pytest.approx(float(total(fwd)))
    # the flash-attention backward does 2.5x the forward's FLOPs
    assert float(b["attn_core"]) == pytest.approx(2.5 * (float(fwd["attn_core"]) - 4e-6) + 8e-6)


def test_persistent_communication_sms_slow_every_gemm() -> None:
    hw, model = load_profile("h800"), load_preset("deepseek-v3")
    free = OpCostModel(hw, model, CostOptions(dtype="fp8"))
    held = OpCostModel(hw, model, CostOptions(dtype="fp8", persistent_comm_sms=True))
    assert held.sms == 132 - 20
    v = np.full((1, 8), 2048.0)
    f, h = free.experts(v), held.experts(v)
    assert float(h["expert_gate_up"][0]) > float(f["expert_gate_up"][0])
    assert float(h["permute"][0]) == float(f["permute"][0])  # bandwidth-bound: unchanged
    a, b = (
        free.attention(4096.0, 2048.0, 0.0, False, 4096),
        held.attention(4096.0, 2048.0, 0.0, False, 4096),
    )
    assert float(b["attn_core"]) == pytest.approx((float(a["attn_core"]) - 4e-6) * 132 / 112 + 4e-6)


def test_sources_name_the_table_behind_each_op() -> None:
    cm = cost_model(load_profile("h800"), load_preset("deepseek-v3"), "fp8", 1)
    cm.attention(4096.0, 2048.0, 0.0, False, 4096)
    cm.experts(np.full((1, 8), 512.0))
    cm.attention(32.0, 4096.0, 32 * 4096.0, True, 0)
    assert "deepgemm fp8 contiguous" in cm.sources["expert_gate_up"]
    assert "deepgemm fp8 dense" in cm.sources["o_proj"]
    assert "flashattention-3" in cm.sources["attn_core"]
    assert cm.sources["permute"].startswith("HBM 3350 GB/s")
    bf = cost_model(load_profile("h800"), load_preset("mixtral-8x7b"), "bf16", 1)
    bf.experts(np.full((1, 8), 512.0))
    assert bf.sources["expert_gate_up"].startswith("roofline (bf16)")


def test_gemm_efficiency_broadcasts_like_scalar_calls() -> None:
    hw = load_profile("h800")
    gm = GemmModel(hw, hw.gpu.sm_count)
    m = np.array([[256.0, 4096.0], [1024.0, 512.0]])
    k = np.array([[7168.0, 3000.0], [2048.0, 16384.0]])
    got = gm.time(m, 4096, k, "fp8", "contiguous", 4)
    for i in np.ndindex(m.shape):
        want = float(gm.time(m[i], 4096, k[i], "fp8", "contiguous", 4))
        assert float(got[i]) == pytest.approx(want, rel=1e-12)


def test_ops_command_breaks_one_layer_down_forward_and_backward() -> None:
    import json

    from typer.testing import CliRunner

    from moesim.cli import app
    from tests.conftest import SCENARIOS

    res = CliRunner().invoke(
        app, ["ops", str(SCENARIOS / "qwen3-moe-train-2x8xh100.yaml"), "--json"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    fwd, bwd = doc["ops_s"]["forward"], doc["ops_s"]["backward"]
    assert set(fwd) == set(bwd) and {"attention", "router", "experts"} <= set(fwd)
    for block in ("attention", "experts"):
        assert sum(bwd[block].values()) > 1.5 * sum(fwd[block].values())
    for ops in (*fwd.values(), *bwd.values()):
        for op, sec in ops.items():
            assert sec > 0 and doc["sources"].get(op), op
    table = CliRunner().invoke(app, ["ops", str(SCENARIOS / "quickstart.yaml")])
    assert table.exit_code == 0 and "MoE layer" in table.output and "backward" not in table.output
