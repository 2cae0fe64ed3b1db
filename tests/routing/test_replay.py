"""Replaying a trace and the fitted generator inside scenarios."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from moesim.config.loading import load_scenario
from moesim.errors import ConfigErrors
from moesim.routing.stage import RoutingStage
from moesim.runner import simulate
from moesim.traces.format import Trace, TraceMeta
from tests.conftest import small_scenario
from tests.traces.conftest import COUNTS, VLLM, needs


def mixtral_trace(tmp_path: Path, layers: int = 32, seqs: int = 40, seq_len: int = 96) -> Path:
    """A trace shaped like Mixtral's routing (8 experts, top-2), random but recognisable."""
    rng = np.random.default_rng(3)
    tokens = seqs * seq_len
    experts = np.stack(
        [np.argsort(rng.random((tokens, 8)), axis=1)[:, :2] for _ in range(layers)]
    ).astype(np.int16)
    trace = Trace.from_layers(
        TraceMeta("mixtral-like", 8, 2, layers, "test"),
        experts,
        seq_len=seq_len,
        first_seq=100,  # sequence ids need not start at 0
        weights=rng.random((layers * tokens, 2)).astype(np.float32),
    )
    return trace.write(tmp_path / f"trace{layers}.parquet")


def _stage(write_scenario, **overrides) -> tuple[RoutingStage, object]:
    r = load_scenario(write_scenario(small_scenario(**overrides)))
    return RoutingStage(r.scenario, r.model, r.gpus_per_node, np.random.default_rng(0)), r


def test_prefill_replays_whole_sequences_with_their_positions(tmp_path, write_scenario) -> None:
    path = mixtral_trace(tmp_path)
    stage, _ = _stage(
        write_scenario,
        **{
            "routing": {"source": "trace", "path": str(path)},
            "workload": {"mode": "prefill", "batch_size": 16, "seq_len": 64, "steps": 2},
        },
    )
    from moesim.traces.format import read_trace

    trace = read_trace(path)
    dense = trace.dense()
    batch = stage.batch(0)
    draw = stage.source.draw(0, np.arange(32), batch, np.random.default_rng(0), True)
    # every simulated sequence is one trace sequence, position for position
    for rank in range(batch.ranks):
        for s in np.unique(batch.seq_id[rank]):
            cols = np.nonzero(batch.seq_id[rank] == s)[0]
            got = draw.experts[5, rank, cols]  # layer 5, positions in order
            matches = [
                np.array_equal(got, dense.experts[5, ts * 96 : ts * 96 + 64]) for ts in range(40)
            ]
            assert sum(matches) == 1
    # the next step takes other sequences
    nxt = stage.source.draw(1, np.arange(1), stage.batch(1), np.random.default_rng(0), False)
    assert not np.array_equal(nxt.experts[0], draw.experts[0])
    assert draw.weights is not None and np.allclose(draw.weights.sum(-1), 1.0)


def test_decode_keeps_sequences_from_step_to_step(tmp_path, write_scenario) -> None:
    path = mixtral_trace(tmp_path)
    stage, _ = _stage(
        write_scenario,
        **{"routing": {"source": "trace", "path": str(path)}, "workload.context_len": 10},
    )
    a = stage.source.draw(0, np.arange(1), stage.batch(0), np.random.default_rng(0), False)
    b = stage.source.draw(1, np.arange(1), stage.batch(1), np.random.default_rng(0), False)
    from moesim.traces.format import read_trace

    dense = read_trace(path).dense()
    # token at position 10 then 11 of the same trace sequence
    seqs = [
        ts
        for ts in range(40)
        if np.array_equal(a.experts[0, 0, 0], dense.experts[0, ts * 96 + 10])
        and np.array_equal(b.experts[0, 0, 0], dense.experts[0, ts * 96 + 11])
    ]
    assert seqs


def test_replay_end_to_end_is_deterministic(tmp_path, write_scenario) -> None:
    path = mixtral_trace(tmp_path)
    scen = write_scenario(
        small_scenario(
            **{
                "routing": {"source": "trace", "path": str(path)},
                "policies": {"capacity": {"type": "capacity", "factor": 1.0}},
            }
        )
    )
    one = simulate(load_scenario(scen)).summary
    two = simulate(load_scenario(scen)).summary
    assert one == two and one["step_time_s"] > 0


def test_mismatches_fail_clearly(tmp_path, write_scenario) -> None:
    path = mixtral_trace(tmp_path, layers=4)
    scen = write_scenario(small_scenario(routing={"source": "trace", "path": str(path)}))
    with pytest.raises(
        ConfigErrors,
        match=r"routing.path: the trace is of a model with 4 MoE "
        "layers, mixtral-8x7b has 32; set routing.layer_map: stretch",
    ):
        load_scenario(scen)
    scen = write_scenario(
        small_scenario(routing={"source": "trace", "path": str(path)}, model="olmoe-1b-7b")
    )
    with pytest.raises(ConfigErrors, match=r"the trace has 8 experts per layer"):
        load_scenario(scen)
    scen = write_scenario(small_scenario(routing={"source": "trace"}))
    with pytest.raises(ConfigErrors, match=r"source trace needs path"):
        load_scenario(scen)


def test_stretch_maps_layers_by_depth(tmp_path, write_scenario) -> None:
    path = mixtral_trace(tmp_path, layers=4)
    stage, _ = _stage(
        write_scenario, routing={"source": "trace", "path": str(path), "layer_map": "stretch"}
    )
    idx = stage.source.layer_idx
    assert idx[0] == 0 and idx[-1] == 3 and np.all(np.diff(idx) >= 0) and len(set(idx)) == 4


def test_trace_steps_filter(tmp_path, write_scenario) -> None:
    path = mixtral_trace(tmp_path)
    scen = write_scenario(
        small_scenario(routing={"source": "trace", "path": str(path), "trace_steps": [5, 9]})
    )
    with pytest.raises(Exception, match=r"no rows with step in \[5, 9\]"):
        simulate(load_scenario(scen))


@needs(COUNTS)
def test_fitted_generator_in_a_scenario(write_scenario) -> None:
    scen = write_scenario(
        small_scenario(
            routing={
                "source": "synthetic",
                "generator": "fitted",
                "fit": str(COUNTS / "mistral.json"),
                "domain": "github",
            }
        )
    )
    r = load_scenario(scen)
    stage = RoutingStage(r.scenario, r.model, r.gpus_per_node, np.random.default_rng(0))
    loads = stage.source.expected_loads()
    assert loads.shape == (32, 8) and np.allclose(loads.sum(axis=1), 1.0)
    result = simulate(r)
    assert result.summary["step_time_s"] > 0


@needs(VLLM)
def test_imported_vllm_trace_replays_end_to_end(tmp_path, write_scenario) -> None:
    from moesim.traces.importers import import_vllm

    path = import_vllm(VLLM).trace.write(tmp_path / "qwen.parquet")
    scen = write_scenario(
        small_scenario(
            **{
                "model": "qwen1.5-moe-a2.7b",
                "parallelism": {"ep": 4, "tp": 1, "dp": 2},
                "workload": {"mode": "prefill", "batch_size": 8, "seq_len": 64, "steps": 2},
                "routing": {"source": "trace", "path": str(path)},
                "policies": {"capacity": {"type": "capacity", "factor": 1.0}},
            }
        )
    )
    summary = simulate(load_scenario(scen)).summary
    assert summary["step_time_s"] > 0 and 0 < summary["drop_rate"] < 0.5


def test_regating_a_fitted_generator_is_a_clean_error(tmp_path) -> None:
    """Was a ValueError (a traceback in the CLI): the fitted generator has no router scores."""
    from typer.testing import CliRunner

    from moesim.cli import app
    from tests.conftest import SCENARIOS, small_scenario

    scenario = small_scenario(
        **{
            "routing": {
                "source": "synthetic",
                "generator": "fitted",
                "fit": str(SCENARIOS / "traces" / "tiny-mixtral.parquet"),
                "layer_map": "stretch",
            },
            "policies.gating.type": "top_k",
        }
    )
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario))
    out = CliRunner().invoke(app, ["run", str(path), "--no-write"])
    assert out.exit_code == 2, out.output
    assert "policies.gating.type: re-gating needs router scores" in out.stderr
