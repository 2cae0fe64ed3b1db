"""What a run will cost, before it runs."""

from __future__ import annotations

import pytest

import moesim.estimate
from moesim.config.loading import load_scenario
from moesim.errors import CapacityError
from moesim.estimate import (
    PER_FLOW_S,
    PER_GPU_LAYER_S,
    PER_LARGE_PHASE_S,
    check_machine,
    estimate,
)
from tests.conftest import SCENARIOS, small_scenario


def test_the_work_of_a_small_decode_by_hand(write_scenario) -> None:
    r = load_scenario(write_scenario(small_scenario()))  # Mixtral, 32 MoE layers, 8 GPUs
    work = estimate(r)
    assert work.gpu_layer_steps == 2 * 32 * 8  # steps x layers x GPUs
    assert work.flows_per_phase == 8 * 8
    assert work.collective_phases == 2 * 32 * 2  # dispatch and combine per MoE layer
    assert work.seconds == pytest.approx(PER_GPU_LAYER_S * 512 + PER_FLOW_S * 128 * 64**1.25)
    train = estimate(
        load_scenario(
            write_scenario(small_scenario()), ["workload.mode=train", "workload.seq_len=8"]
        )
    )
    assert train.collective_phases == 2 * work.collective_phases  # backward repeats them


def test_a_large_phase_costs_by_the_square_root_of_its_flows() -> None:
    # DeepSeek-V3 decode on 32 nodes of 8, EP256: 65,536 flows a phase, past the point where
    # small phases' power law would overstate it (B3 measures about 0.03 s a phase and layer:
    # the phase's network work and, spread over the phases, its routing draw).
    work = estimate(load_scenario(SCENARIOS / "deepseek-v3-decode-256xh800.yaml"))
    assert work.flows_per_phase == 256 * 256
    per_phase = (work.seconds - PER_GPU_LAYER_S * work.gpu_layer_steps) / work.collective_phases
    assert per_phase == pytest.approx(PER_LARGE_PHASE_S * 256)
    assert 0.01 < per_phase < 0.1


def test_a_run_too_big_for_memory_is_refused(write_scenario, monkeypatch) -> None:
    monkeypatch.setattr(moesim.estimate, "machine_memory", lambda: 2.0**30)
    r = load_scenario(write_scenario(small_scenario()), ["workload.steps=100000"])
    with pytest.raises(CapacityError, match=r"lower workload\.steps"):
        check_machine(r, estimate(r))
