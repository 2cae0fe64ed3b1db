"""What a run will cost, before it runs."""

from __future__ import annotations

import pytest

import moesim.estimate
from moesim.config.loading import load_scenario
from moesim.errors import CapacityError
from moesim.estimate import (
    PER_ASSIGNMENT_S,
    PER_FLOW_S,
    PER_GPU_LAYER_S,
    PER_LOCKSTEP_WALK_S,
    PER_PHASE_FLOW_S,
    PHASE_S,
    check_machine,
    estimate,
    lockstep_like,
)
from tests.conftest import SCENARIOS, small_scenario


def test_the_work_of_a_small_decode_by_hand(write_scenario) -> None:
    r = load_scenario(write_scenario(small_scenario()))  # Mixtral, 32 MoE layers, 8 GPUs
    work = estimate(r)
    assert work.gpu_layer_steps == 2 * 32 * 8  # steps x layers x GPUs
    assert work.flows_per_phase == 8 * 8
    assert work.collective_phases == 2 * 32 * 2  # dispatch and combine per MoE layer
    assert lockstep_like(r)  # one compiled call a phase
    assignments = 2 * 32 * r.scenario.workload.batch_size * 2  # steps x layers x tokens x k
    assert work.seconds == pytest.approx(
        PER_LOCKSTEP_WALK_S * 512 + 128 * (PHASE_S + PER_PHASE_FLOW_S * 64)
        + PER_ASSIGNMENT_S * assignments
    )  # fmt: skip
    tbo = estimate(
        load_scenario(write_scenario(small_scenario()), ["policies.overlap.micro_batches=2"])
    )
    assert tbo.seconds == pytest.approx(  # on SimPy
        PER_GPU_LAYER_S * 1024 + PER_FLOW_S * 256 * 64**1.25 + PER_ASSIGNMENT_S * assignments
    )
    train = estimate(
        load_scenario(
            write_scenario(small_scenario()), ["workload.mode=train", "workload.seq_len=8"]
        )
    )
    assert train.collective_phases == 2 * work.collective_phases  # backward repeats them


def test_a_large_lockstep_phase_costs_by_its_flows() -> None:
    # DeepSeek-V3 decode on 32 nodes of 8, EP256: 65,536 flows a phase in one compiled call
    # (B3 measures about 2 ms a phase with its flows built and counted).
    work = estimate(load_scenario(SCENARIOS / "deepseek-v3-decode-256xh800.yaml"))
    assert work.flows_per_phase == 256 * 256
    assignments = 2 * 58 * 32768 * 8  # steps x MoE layers x tokens x k
    rest = work.seconds - PER_LOCKSTEP_WALK_S * work.gpu_layer_steps
    per_phase = (rest - PER_ASSIGNMENT_S * assignments) / work.collective_phases
    assert per_phase == pytest.approx(PHASE_S + PER_PHASE_FLOW_S * 65536)
    assert 0.001 < per_phase < 0.01


def test_a_run_too_big_for_memory_is_refused(write_scenario, monkeypatch) -> None:
    monkeypatch.setattr(moesim.estimate, "machine_memory", lambda: 2.0**30)
    r = load_scenario(write_scenario(small_scenario()), ["workload.steps=100000"])
    with pytest.raises(CapacityError, match=r"lower workload\.steps"):
        check_machine(r, estimate(r))
