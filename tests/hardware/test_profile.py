"""Hardware profiles: all ship, every figure is cited, an uncited figure is refused."""

from __future__ import annotations

import pytest
import yaml

from moesim.errors import ConfigErrors
from moesim.hardware.catalog import load_profile, profile_names
from tests.conftest import ROOT

REQUIRED = {"h100-sxm", "h800", "a100-sxm-80g", "h200", "b200", "mi300x", "l40s-pcie"}


def test_required_profiles_ship() -> None:
    assert set(profile_names()) >= REQUIRED


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_profile_loads_and_cites_sources(name: str) -> None:
    p = load_profile(name)
    assert p.sources and all(len(v) > 20 for v in p.sources.values())


def test_uncited_figure_is_refused(tmp_path) -> None:
    data = yaml.safe_load((ROOT / "moesim" / "hardware" / "profiles" / "h100-sxm.yaml").read_text())
    del data["sources"]["gpu.hbm_bandwidth_gb_per_s"]
    path = tmp_path / "uncited.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigErrors, match=r"gpu\.hbm_bandwidth_gb_per_s"):
        load_profile(str(path))


def test_every_source_says_whether_it_is_measured_published_or_assumed(tmp_path) -> None:
    for name in profile_names():
        p = load_profile(name)
        assert {p.status_of(k) for k in p.sources} <= {"measured", "published", "assumed"}
    h800 = load_profile("h800")
    assert h800.status_of("gpu.peak_dense_tflops.fp8") == "published"
    assert h800.status_of("fabric.latency_s") == "assumed"  # an engineering estimate
    assert load_profile("h100-sxm").status_of("gpu.matmul_efficiency") == "measured"
    assert {t.status for t in h800.kernels.gemm} == {"published"}
    data = yaml.safe_load((ROOT / "moesim" / "hardware" / "profiles" / "h800.yaml").read_text())
    data["sources"]["gpu.hbm_bytes"] = "NVIDIA H100 datasheet (SXM5), 80 GB HBM3."
    path = tmp_path / "untagged.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigErrors, match=r"must start with 'measured: '.*gpu\.hbm_bytes"):
        load_profile(str(path))


def test_h800_nvlink_is_the_deepep_setting() -> None:
    p = load_profile("h800")
    achieved = p.node.nvlink_gb_per_s * p.node.nvlink_efficiency
    assert 150 <= achieved <= 170  # DeepEP: ~160 GB/s maximum


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("gpu", "peak_dense_tflops", "bf16"), 0, "peak_dense_tflops must be positive"),
        (("gpu", "hbm_bandwidth_gb_per_s"), float("nan"), "finite number"),
        (("gpu", "kernel_launch_s"), float("inf"), "finite number"),
        (("fabric", "oversubscription"), float("inf"), "finite number"),
        (("node", "host_memory_bytes"), 1e300, "figures over"),
    ],
)
def test_physical_figures_are_finite_and_in_range(tmp_path, path, value, message) -> None:
    data = yaml.safe_load((ROOT / "moesim" / "hardware" / "profiles" / "h100-sxm.yaml").read_text())
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigErrors, match=message):
        load_profile(str(tmp_path / "bad.yaml"))


def test_a_profile_without_nics_runs_on_one_node_and_names_the_field_on_two(tmp_path) -> None:
    from moesim.config.loading import load_scenario
    from moesim.runner import simulate
    from tests.conftest import small_scenario

    data = yaml.safe_load((ROOT / "moesim" / "hardware" / "profiles" / "h100-sxm.yaml").read_text())
    del data["node"]["nic_gb_per_s"], data["sources"]["node.nic_gb_per_s"]
    (tmp_path / "nonic.yaml").write_text(yaml.safe_dump(data))
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(small_scenario(hardware=str(tmp_path / "nonic.yaml"))))
    assert simulate(load_scenario(scenario)).summary["step_time_s"] > 0  # used to never end
    with pytest.raises(ConfigErrors, match=r"cluster\.nodes: 2 nodes need a network"):
        load_scenario(scenario, ["cluster.nodes=2", "parallelism.ep=16"])
