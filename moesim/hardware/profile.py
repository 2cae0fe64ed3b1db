"""Hardware profiles: the device and link facts the simulator predicts from.

A profile is a YAML file: shipped in ``moesim/hardware/profiles/``, or a user's own in
``hardware_profiles/``. Every numeric figure must be covered by an
entry of its ``sources:`` map, keyed by the figure's dotted path or a prefix of it
(``gpu.peak_dense_tflops`` covers ``gpu.peak_dense_tflops.bf16``); a profile with an uncited
figure does not load. Every source begins with the figure's status: ``measured:`` (on a
device: ``moesim calibrate``, or a vendor's measurement data), ``published:`` (datasheets,
papers, project documentation) or ``assumed:`` (an estimate, or a figure carried over from
another device); kernel tables carry a ``status`` field of their own. Bandwidths are in GB/s
(1e9 bytes per second) per direction.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class GPUSpec(_Frozen):
    """One accelerator."""

    model: str = Field(description="Marketing name of the accelerator.")
    peak_dense_tflops: dict[str, float] = Field(
        description="Peak dense matrix TFLOP/s per dtype (bf16, fp16, fp8, fp32)."
    )
    hbm_bytes: float = Field(gt=0, description="Device memory in bytes.")
    hbm_bandwidth_gb_per_s: float = Field(gt=0, description="Peak device memory bandwidth, GB/s.")
    sm_count: int = Field(gt=0, description="Streaming multiprocessors (compute units).")
    comm_sms: int = Field(
        0,
        ge=0,
        description="SMs that kernel-driven collectives (NCCL, DeepEP normal kernels) occupy "
        "while in flight; compute overlapping them runs on the rest (0: not modelled).",
    )
    kernel_launch_s: float = Field(ge=0, le=1, description="Fixed cost per kernel launch, seconds.")
    matmul_efficiency: float = Field(
        gt=0, le=1, description="Fraction of peak matrix FLOP/s that large GEMMs reach."
    )
    memory_efficiency: float = Field(
        gt=0, le=1, description="Fraction of peak HBM bandwidth that streaming kernels reach."
    )
    workspace_bytes: float = Field(
        ge=0, description="HBM reserved for the runtime, communication buffers and allocator."
    )

    @model_validator(mode="after")
    def _check(self) -> GPUSpec:
        bad = {k: v for k, v in self.peak_dense_tflops.items() if not 0 < v < 1e6}
        if bad:
            raise ValueError(f"peak_dense_tflops must be positive and finite, got {bad}")
        if self.comm_sms >= self.sm_count:
            raise ValueError(
                f"comm_sms ({self.comm_sms}) must leave SMs for compute (sm_count {self.sm_count})"
            )
        return self

    @property
    def comm_compute_rate(self) -> float:
        """Compute speed while a kernel-driven collective holds ``comm_sms`` SMs."""
        return (self.sm_count - self.comm_sms) / self.sm_count


class NodeSpec(_Frozen):
    """One server: its GPUs, their interconnect, NICs and host link."""

    gpus_per_node: int = Field(gt=0, description="GPUs in one node.")
    interconnect: Literal["nvswitch", "mesh", "pcie"] = Field(
        description="Intra-node GPU fabric: a switch (nvswitch), direct all-to-all links (mesh), "
        "or PCIe only."
    )
    nvlink_gb_per_s: float = Field(
        0, ge=0, description="NVLink/NVSwitch GB/s per GPU, per direction."
    )
    nvlink_efficiency: float = Field(
        1, gt=0, le=1, description="Reachable fraction of NVLink rate."
    )
    nvlink_latency_s: float = Field(
        0, ge=0, le=1, description="GPU-to-GPU latency over NVLink, seconds."
    )
    pcie_gb_per_s: float = Field(gt=0, description="PCIe GB/s per GPU link, per direction.")
    pcie_efficiency: float = Field(gt=0, le=1, description="Reachable fraction of PCIe rate.")
    pcie_latency_s: float = Field(ge=0, le=1, description="Latency of one PCIe hop, seconds.")
    gpus_per_pcie_switch: int = Field(1, gt=0, description="GPUs behind one PCIe switch.")
    nic_gb_per_s: float = Field(
        0, ge=0, description="Network GB/s per GPU (its NIC), per direction."
    )
    nic_efficiency: float = Field(1, gt=0, le=1, description="Reachable fraction of NIC rate.")
    host_memory_bytes: float = Field(gt=0, description="Host DRAM per node, bytes.")
    host_memory_gb_per_s: float | None = Field(
        None, gt=0, description="Host DRAM bandwidth per node, GB/s (CPU expert execution)."
    )
    host_tflops: float | None = Field(
        None, gt=0, description="Host CPUs' peak FP32 TFLOP/s per node (CPU expert execution)."
    )

    @model_validator(mode="after")
    def _check(self) -> NodeSpec:
        if self.interconnect != "pcie" and self.nvlink_gb_per_s <= 0:
            raise ValueError(f"interconnect {self.interconnect} needs nvlink_gb_per_s > 0")
        if self.gpus_per_node % self.gpus_per_pcie_switch:
            raise ValueError("gpus_per_pcie_switch must divide gpus_per_node")
        return self


class FabricSpec(_Frozen):
    """The network between nodes."""

    topology: Literal["rail_optimized", "fat_tree"] = Field(description="Inter-node topology.")
    oversubscription: float = Field(
        1, ge=1, le=1000, description="Leaf-to-spine oversubscription ratio."
    )
    latency_s: float = Field(
        ge=0, le=1, description="NIC-to-NIC latency through one switch, seconds."
    )
    spine_latency_s: float = Field(0, ge=0, le=1, description="Extra latency through the spine.")


class ExpertCalibration(_Frozen):
    """Measured expert-FFN time of one shape and dtype (see :mod:`moesim.calibration.fit`)."""

    hidden: int = Field(gt=0, description="Model hidden size.")
    width: int = Field(gt=0, description="Expert FFN width on one GPU (after tensor parallelism).")
    matrices: int = Field(ge=2, le=3, description="Weight matrices per expert (3: gated).")
    dtype: str = Field(description="Weight and compute dtype measured.")
    tokens: list[float] = Field(min_length=2, description="Grid of tokens per expert, ascending.")
    seconds: list[float] = Field(min_length=2, description="Fitted per-expert time at each point.")
    overhead_s: float = Field(ge=0, description="Fixed cost of one grouped call, seconds.")
    holdout_cases: int = Field(ge=0, description="Token distributions held out of the fit.")
    holdout_max_abs_error: float = Field(
        ge=0, description="Largest relative error of the fit on the held-out distributions."
    )

    @model_validator(mode="after")
    def _check(self) -> ExpertCalibration:
        if len(self.tokens) != len(self.seconds):
            raise ValueError("tokens and seconds must have the same length")
        if self.tokens[0] < 1 or any(
            b <= a for a, b in zip(self.tokens, self.tokens[1:], strict=False)
        ):
            raise ValueError("tokens must be ascending and >= 1")
        if any(s < 0 for s in self.seconds):
            raise ValueError("seconds must be >= 0")
        return self


class Calibration(_Frozen):
    """What `moesim calibrate` measured, citing its raw measurement file."""

    backend: str = Field(description="Backend that measured (cuda, torch, cpu).")
    device: str = Field(description="Device the measurements were taken on.")
    created: str = Field(description="UTC time of the measurements.")
    measurements: str = Field(
        min_length=1, description="Raw measurement file (JSON), relative to this profile."
    )
    experts: list[ExpertCalibration] = Field(description="Expert-FFN tables per shape and dtype.")

    def table_for(
        self, hidden: int, width: int, matrices: int, dtype: str
    ) -> ExpertCalibration | None:
        """The table for exactly this shape and dtype, or None."""
        for t in self.experts:
            if (t.hidden, t.width, t.matrices, t.dtype) == (hidden, width, matrices, dtype):
                return t
        return None


TableStatus = Literal["measured", "published", "assumed"]


class GemmTable(_Frozen):
    """Achieved matrix throughput of one GEMM kernel family at measured shapes.

    Each point is ``[groups, m, n, k, tflops]``: ``groups`` problems of ``m`` rows (tokens) by
    ``n`` outputs over ``k`` inputs, at ``2 * groups * m * n * k / seconds / 1e12`` TFLOP/s
    (``moesim calibrate`` and the AIConfigurator importer write the same format).
    """

    kernel: str = Field(min_length=1, description="Kernel family (e.g. deepgemm-fp8).")
    dtype: str = Field(description="Weight and input dtype (fp8, bf16, ...).")
    layout: Literal["dense", "contiguous", "masked"] = Field(
        "dense",
        description="dense: one matrix; contiguous: grouped, each group's rows padded to the "
        "block (prefill, training); masked: grouped with a fixed slot per group (decode).",
    )
    status: TableStatus = Field(description="measured on a device, published, or assumed.")
    source: str = Field(min_length=1, description="Where the points come from.")
    points: list[tuple[int, int, int, int, float]] = Field(
        min_length=1, description="[groups, m, n, k, tflops] per measured shape."
    )

    @staticmethod
    def point(m: int, n: int, k: int, seconds: float) -> list[float]:
        """The point of one measured dense GEMM: ``[1, m, n, k, tflops]`` (5 digits)."""
        return [1, int(m), int(n), int(k), float(f"{2.0 * m * n * k / seconds / 1e12:.5g}")]

    @model_validator(mode="after")
    def _check(self) -> GemmTable:
        bad = [
            p
            for p in self.points
            if not (min(p[:4]) >= 1 and max(p[:4]) <= 2**31 and 0 < p[4] < 1e6)
        ]
        if bad:
            raise ValueError(
                f"points need 1 <= groups, m, n, k <= 2**31 and 0 < tflops < 1e6: {bad[:3]}"
            )
        return self


class AttentionTable(_Frozen):
    """Achieved throughput of an attention kernel.

    ``prefill`` (causal, training forward too): ``points`` of ``[seq_len, tflops]``;
    ``decode``: the kernel's achieved HBM rate (``gb_per_s``) when reading the KV cache and its
    compute rate (``tflops``) when many query heads share it.
    """

    kind: Literal["prefill", "decode"] = Field(description="Which attention phase.")
    kernel: str = Field(min_length=1, description="Kernel (e.g. flashattention-3, flashmla).")
    dtype: str = Field("bf16", description="Dtype the kernel computes in.")
    attention: Literal["gqa", "mla", "any"] = Field("any", description="Attention family.")
    status: TableStatus = Field(description="measured on a device, published, or assumed.")
    source: str = Field(min_length=1, description="Where the figures come from.")
    points: list[tuple[float, float]] = Field(
        default_factory=list, description="prefill: [seq_len, tflops] per measured length."
    )
    gb_per_s: float | None = Field(None, gt=0, lt=1e6, description="decode: achieved HBM GB/s.")
    tflops: float | None = Field(None, gt=0, lt=1e6, description="decode: achieved TFLOP/s.")

    @model_validator(mode="after")
    def _check(self) -> AttentionTable:
        if self.kind == "prefill" and not self.points:
            raise ValueError("a prefill attention table needs points [seq_len, tflops]")
        if self.kind == "decode" and (self.gb_per_s is None or self.tflops is None):
            raise ValueError("a decode attention table needs gb_per_s and tflops")
        if any(not (1 <= p[0] <= 2**31 and 0 < p[1] < 1e6) for p in self.points):
            raise ValueError("points need 1 <= seq_len <= 2**31 and 0 < tflops < 1e6")
        return self


class CollectiveLatency(_Frozen):
    """Fixed costs a collective pays besides moving its bytes (each cited in ``sources``)."""

    deepep_notify_s: float = Field(
        0, ge=0, le=1, description="DeepEP normal kernels' notify/layout handshake per call."
    )
    nccl_launch_s: float = Field(0, ge=0, le=1, description="NCCL kernel launch per call.")
    host_sync_s: float = Field(
        0, ge=0, le=1, description="Host synchronisation per call without CUDA graphs."
    )


class Kernels(_Frozen):
    """Per-kernel calibration: GEMM and attention tables, tile sizes, collective fixed costs."""

    gemm_block: tuple[int, int] = Field(
        (128, 128), description="GEMM output tile (rows, columns): rows are padded to it."
    )
    gemm: list[GemmTable] = Field(default_factory=list, description="GEMM throughput tables.")
    attention: list[AttentionTable] = Field(
        default_factory=list, description="Attention kernel throughput."
    )
    collectives: CollectiveLatency = Field(
        default_factory=CollectiveLatency, description="Fixed costs of collectives."
    )


class HardwareProfile(_Frozen):
    """A cluster building block: GPU, node and fabric facts, each figure with its source.

    Example:
        >>> from moesim.hardware.catalog import load_profile
        >>> p = load_profile("h100-sxm")
        >>> p.node.gpus_per_node, p.gpu.hbm_bandwidth_gb_per_s
        (8, 3350.0)
    """

    name: str = Field(description="Profile name (the file stem).")
    description: str = Field(description="What hardware this is.")
    gpu: GPUSpec
    node: NodeSpec
    fabric: FabricSpec
    kernels: Kernels = Field(
        default_factory=Kernels,
        description="Per-kernel tables (published or measured); absent: flat efficiencies.",
    )
    calibration: Calibration | None = Field(
        None, description="Measured tables written by `moesim calibrate` (absent: roofline)."
    )
    sources: dict[str, str] = Field(description="Field path (or prefix) -> source of the figure.")

    @model_validator(mode="after")
    def _every_figure_cited(self) -> HardwareProfile:
        missing = [
            p
            for p in numeric_paths(
                self.model_dump(exclude={"sources", "calibration"}, exclude_unset=True)
            )
            if not _cited(p, self.sources)
        ]
        if missing:
            raise ValueError(f"figures without a source in 'sources': {', '.join(missing)}")
        return self

    @model_validator(mode="after")
    def _every_source_says_its_status(self) -> HardwareProfile:
        untagged = [k for k, v in self.sources.items() if not v.startswith(STATUS_TAGS)]
        if untagged:
            raise ValueError(
                "every source must start with 'measured: ', 'published: ' or 'assumed: ' "
                f"(measured on a device, published, or an assumption): {', '.join(untagged)}"
            )
        return self

    def status_of(self, path: str) -> str:
        """``measured``, ``published`` or ``assumed``: the tag of the source citing ``path``."""
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            src = self.sources.get(".".join(parts[:i]))
            if src is not None:
                return src.split(":", 1)[0]
        raise KeyError(f"no source cites {path}")

    @model_validator(mode="after")
    def _figures_in_range(self) -> HardwareProfile:
        figures = self.model_dump(include={"gpu", "node", "fabric"})
        huge = [p for p in numeric_paths(figures) if abs(_at(figures, p)) > MAX_FIGURE]
        if huge:
            raise ValueError(f"figures over {MAX_FIGURE:g} (units are GB/s, bytes, s): {huge}")
        return self

    def peak_flops(self, dtype: str) -> float:
        """Peak dense FLOP/s for ``dtype`` (falls back to bf16 where the dtype is not listed)."""
        table = self.gpu.peak_dense_tflops
        return 1e12 * table.get(dtype, table.get("bf16", next(iter(table.values()))))


STATUS_TAGS = ("measured: ", "published: ", "assumed: ")
"""How every source begins: measured on a device, published, or an assumption."""

MAX_FIGURE = 1e18
"""Largest figure a profile may state (no bandwidth, size or peak comes near it)."""


def _at(data: dict[str, Any], path: str) -> float:
    for part in path.split("."):
        data = data[part]
    return float(data)  # type: ignore[arg-type]


def numeric_paths(data: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every int/float leaf in nested dicts (bools excluded)."""
    if isinstance(data, dict):
        out: list[str] = []
        for key, value in data.items():
            out += numeric_paths(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(data, (int, float)) and not isinstance(data, bool):
        return [prefix]
    return []


def _cited(path: str, sources: dict[str, str]) -> bool:
    parts = path.split(".")
    return any(".".join(parts[:i]) in sources for i in range(1, len(parts) + 1))
