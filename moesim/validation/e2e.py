"""End-to-end published measurements (../shared/validation/published.md section 6, and vLLM's
published nightly benchmark), predicted from scenarios shipped in ``scenarios/validation/``.

Each case names its scenario (the published setup stated as facts: model, hardware profile,
cluster, parallelism, workload, policies), the published figure, how the authors count it, and
where it was published. The prediction runs the scenario and counts the same way; the error is
reported whatever it is. Nothing here feeds a published figure back into the model.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moesim.errors import ConfigError

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios" / "validation"
"""The validation scenarios of a checkout (an installed moesim is given ``--scenarios``)."""


def input_tokens_per_s_per_node(summary: dict[str, Any], nodes: int) -> float:
    """Tokens processed per second, per node of the cluster."""
    return float(summary["tokens_per_s"]) / nodes


def serving_input_tokens_per_s_per_node(summary: dict[str, Any], _nodes: int) -> float:
    """Input tokens per second per node of a serving run."""
    return float(summary["serving"]["input_tokens_per_s_per_node"])


def serving_e2e_mean_ms(summary: dict[str, Any], _nodes: int) -> float:
    """Mean end-to-end latency of a serving run's requests, in milliseconds."""
    return 1000.0 * float(summary["serving"]["e2e_s"]["mean"])


def tokens_per_s_per_gpu(summary: dict[str, Any], _nodes: int) -> float:
    """Training tokens per second per GPU (the global batch's tokens over the step time)."""
    return float(summary["tokens_per_s"]) / int(summary["gpus"])


@dataclass(frozen=True)
class Case:
    """One published end-to-end figure.

    Attributes:
        scenario: File name in the validation scenarios folder.
        published: The published figure.
        counted_as: What the figure counts, in the authors' words.
        source: Where it was published.
        measure: The same count from a run's summary and its node count.
        profiles: Hardware profiles to predict it on (None: the scenario's own). A case runs
            on each, so that published-figure and measured kernel tables can be compared.
    """

    scenario: str
    published: float
    counted_as: str
    source: str
    measure: Callable[[dict[str, Any], int], float]
    profiles: tuple[str | None, ...] = (None,)


CASES = (
    Case(
        "sglang-deepseek-v3-prefill-4x8xh100.yaml",
        50_302.0,
        "input tokens/s per node",
        "LMSYS blog 2025-05-05 (SGLang, DeepSeek-V3 prefill, 4x8 H100, EP32, TBO); published.md 6a",
        input_tokens_per_s_per_node,
        # h100-sxm: DeepGEMM / FlashAttention-3 published figures; h100-sxm-aiconfigurator:
        # NVIDIA's measured H100 kernel tables (aiconfigurator-core, `make profiles`)
        profiles=(None, "h100-sxm-aiconfigurator"),
    ),
    Case(
        "sglang-deepseek-v3-prefill-serve-4x8xh100.yaml",
        50_302.0,
        "input tokens/s per node (through the serving path)",
        "LMSYS blog 2025-05-05 (SGLang, DeepSeek-V3 prefill, 4x8 H100, EP32, TBO); published.md 6a",
        serving_input_tokens_per_s_per_node,
        profiles=(None, "h100-sxm-aiconfigurator"),
    ),
    Case(
        "nemo-qwen3-30b-a3b-train-16xh100.yaml",
        5_275.0,
        "training tokens/s per GPU",
        "NVIDIA NeMo Megatron-Bridge performance summary, 25.11 container, DGX-H100 "
        "(Qwen3_30B_a3B, 16 GPUs, FP8-CS, GBS 512, MBS 2, PP2 VP24 EP8)",
        tokens_per_s_per_gpu,
        profiles=(None, "h100-sxm-aiconfigurator"),
    ),
    Case(
        "../deepseek-v3-train-2048xh800.yaml",
        1e12 / (180_000 * 3600),
        "training tokens/s per GPU (180K H800 GPU hours per trillion tokens)",
        "DeepSeek-V3 technical report (arXiv 2412.19437), section 1 and table 1; layout from "
        "section 3.2 (2,048 H800, PP16 DualPipe, EP64, ZeRO-1)",
        tokens_per_s_per_gpu,
    ),
    Case(
        "vllm-mixtral-8x7b-latency-tp2-h200.yaml",
        1_921.1,
        "end-to-end ms (mean)",
        "vLLM nightly performance benchmark, latency_mixtral8x7B_tp2 on H200: a batch of 8 "
        "requests of 32 input and 128 output tokens "
        "(buildkite.com/vllm/performance-benchmark/builds/9513)",
        serving_e2e_mean_ms,
    ),
    Case(
        "vllm-mixtral-8x7b-latency-tp2-a100.yaml",
        3_643.84,
        "end-to-end ms (mean)",
        "vLLM nightly performance benchmark, latency_mixtral8x7B_tp2 on A100-SXM4-80GB: a "
        "batch of 8 requests of 32 input and 128 output tokens "
        "(buildkite.com/vllm/performance-benchmark/builds/9523)",
        serving_e2e_mean_ms,
    ),
)


@dataclass(frozen=True)
class E2ERow:
    """Predicted vs published for one case."""

    case: str
    profile: str
    counted_as: str
    source: str
    published: float
    predicted: float
    step_time_s: float
    ops_s: dict[str, float]
    breakdown_s: dict[str, float]

    @property
    def error(self) -> float:
        """Relative error of the prediction (positive: predicted above published)."""
        return self.predicted / self.published - 1.0

    def as_dict(self) -> dict[str, object]:
        """The row and its error, for ``--json``."""
        return {**self.__dict__, "error": self.error}


def validate_e2e(folder: Path = SCENARIOS, only: Collection[str] | None = None) -> list[E2ERow]:
    """Run every case's scenario from ``folder`` (``only``: the cases of these scenario
    files) and compare with the published figure.

    Raises:
        ConfigError: a case's scenario is missing from ``folder``.
    """
    from moesim.config.loading import load_scenario
    from moesim.runner import simulate

    rows = []
    for case in CASES:
        if only is not None and case.scenario not in only:
            continue
        path = folder / case.scenario
        if not path.is_file():
            raise ConfigError(
                None, "--scenarios", f"no {case.scenario} in '{folder}' (the validation scenarios)"
            )
        for profile in case.profiles:
            resolved = load_scenario(path, None if profile is None else [f"hardware={profile}"])
            if resolved.scenario.workload.mode == "serve":
                from moesim.serving.run import simulate_serving

                served = simulate_serving(resolved)
                summary = served.summary
                busy = served.steps.end_s - served.steps.start_s
                summary |= {
                    "step_time_s": float(busy.mean()),
                    "ops_s": {},
                    "breakdown_s": {},
                }
            else:
                summary = simulate(resolved).summary
            rows.append(
                E2ERow(
                    case=resolved.scenario.name,
                    profile=resolved.hardware.name,
                    counted_as=case.counted_as,
                    source=case.source,
                    published=case.published,
                    predicted=case.measure(summary, resolved.scenario.cluster.nodes),
                    step_time_s=float(summary["step_time_s"]),
                    ops_s=dict(summary["ops_s"]),
                    breakdown_s=dict(summary["breakdown_s"]),
                )
            )
    return rows
