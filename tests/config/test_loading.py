"""Scenario loading: valid files resolve; each kind of bad input names file, field, expectation."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesim.config.loading import load_scenario
from moesim.errors import ConfigError, ConfigErrors
from tests.conftest import SCENARIOS, small_scenario


def errors_of(path: Path, overrides: list[str] | None = None) -> list[ConfigError]:
    with pytest.raises((ConfigError, ConfigErrors)) as info:
        load_scenario(path, overrides)
    exc = info.value
    return exc.errors if isinstance(exc, ConfigErrors) else [exc]


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_scenarios_load(path: Path) -> None:
    r = load_scenario(path)
    assert r.world == r.scenario.cluster.nodes * r.hardware.node.gpus_per_node


BAD = [
    # (description, scenario overrides or raw text, expected field, expected words)
    ("unknown top-level key", {"worklod": {}}, "worklod", "did you mean 'workload'"),
    (
        "unknown nested key",
        {"workload.batchsize": 4},
        "workload.batchsize",
        "did you mean 'batch_size'",
    ),
    ("wrong type", {"workload.batch_size": "many"}, "workload.batch_size", "valid integer"),
    ("negative number", {"workload.steps": -1}, "workload.steps", "greater than or equal to 1"),
    ("bad mode", {"workload.mode": "serving"}, "workload.mode", "'train' or 'serve'"),
    ("unknown model preset", {"model": "mixtral-8x8b"}, "model", "did you mean 'mixtral-8x7b'"),
    ("unknown hardware", {"hardware": "h100"}, "hardware", "unknown hardware profile"),
    (
        "unknown placement",
        {"policies.placement.type": "roundrobin"},
        "policies.placement.type",
        "valid: contiguous",
    ),
    (
        "capacity without factor",
        {"policies.capacity.type": "capacity"},
        "policies.capacity",
        "needs a factor",
    ),
    ("world size mismatch", {"parallelism.ep": 4}, "parallelism", "but the cluster has"),
    (
        "ep does not divide experts",
        {"parallelism.ep": 16, "cluster.nodes": 2},
        "parallelism.ep",
        "must divide the 8 experts",
    ),
    (
        "redundant experts on a placement that makes no replicas",
        {
            "parallelism.ep": 16,
            "cluster.nodes": 2,
            "policies.placement.redundant_experts": 8,
            "workload.batch_size": 64,
        },
        "policies.placement.type",
        "contiguous keeps one copy per expert",
    ),
    (
        "batch not multiple of ep",
        {"workload.batch_size": 60},
        "workload.batch_size",
        "multiple of ep",
    ),
    ("decode without context", {"workload.context_len": 0}, "workload", "needs context_len"),
    (
        "fp8 on a GPU without fp8",
        {"hardware": "a100-sxm-80g", "workload.dtype": "fp8"},
        "workload.dtype",
        "no fp8",
    ),
    (
        "unknown drop policy",
        {"policies.capacity.drop": "oldest"},
        "policies.capacity.drop",
        "unknown drop policy 'oldest'",
    ),
    ("bad skew", {"routing.skew": 9}, "routing.skew", "less than or equal to 4"),
    (
        "two micro-batches of one token",
        {"workload.batch_size": 8, "policies.overlap.micro_batches": 2},
        "policies.overlap.micro_batches",
        "at least 2 tokens per EP rank",
    ),
    (
        "three micro-batches",
        {"policies.overlap.micro_batches": 3},
        "policies.overlap.micro_batches",
        "less than or equal to 2",
    ),
]


@pytest.mark.parametrize(("what", "change", "field", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_scenarios_name_file_field_and_expectation(
    write_scenario, what, change, field, words
) -> None:
    path = write_scenario(small_scenario(**change))
    errs = errors_of(path)
    assert any(e.field == field and words in e.message for e in errs), [str(e) for e in errs]
    assert all(e.file == str(path) for e in errs)


def test_invalid_yaml_reports_line(write_scenario, tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nworkload: {mode: decode\n", encoding="utf-8")
    (err,) = errors_of(path)
    assert "invalid YAML at line" in err.message and err.file == str(path)


def test_missing_file() -> None:
    (err,) = errors_of(Path("no/such/scenario.yaml"))
    assert err.message == "file not found"


def test_several_errors_reported_together(write_scenario) -> None:
    path = write_scenario(small_scenario(**{"workload.steps": 0, "seed": -3}))
    fields = {e.field for e in errors_of(path)}
    assert {"workload.steps", "seed"} <= fields


def test_overrides_change_fields_and_types(write_scenario) -> None:
    path = write_scenario(small_scenario())
    r = load_scenario(
        path,
        [
            "workload.batch_size=128",
            "routing.generator=zipf",
            "routing.skew=1.5",
            "policies.capacity.type=capacity",
            "policies.capacity.factor=1.0",
        ],
    )
    assert r.scenario.workload.batch_size == 128
    assert r.scenario.routing.skew == 1.5
    assert r.scenario.policies.capacity.factor == 1.0


def test_override_errors_name_the_file(write_scenario) -> None:
    path = write_scenario(small_scenario())
    (err,) = errors_of(path, ["workload.steps=zero"])
    assert err.field == "workload.steps" and err.file == str(path)
    (err,) = errors_of(path, ["nonsense"])
    assert err.field == "--set" and "key.path=value" in err.message


def test_loading_writes_nothing(write_scenario, tmp_path: Path) -> None:
    path = write_scenario(small_scenario())
    before = sorted(tmp_path.rglob("*"))
    load_scenario(path)
    assert sorted(tmp_path.rglob("*")) == before


def test_redundant_experts_fill_slots_up_to_a_multiple_of_ep() -> None:
    """60 experts do not split over EP8; with 4 redundant replicas of hot experts (EPLB), the
    64 slots do."""
    sets = ["model=qwen1.5-moe-a2.7b", "policies.placement.type=eplb"]
    r = load_scenario(
        SCENARIOS / "mixtral-8x7b-decode-8xh100.yaml",
        [*sets, "policies.placement.redundant_experts=4"],
    )
    assert r.scenario.parallelism.ep == 8
    errors = errors_of(SCENARIOS / "mixtral-8x7b-decode-8xh100.yaml", sets)
    assert [e.field for e in errors] == ["parallelism.ep"]
    assert "redundant_experts fill the slots" in str(errors[0])
