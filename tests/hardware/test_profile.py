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


def test_h800_nvlink_is_the_deepep_setting() -> None:
    p = load_profile("h800")
    achieved = p.node.nvlink_gb_per_s * p.node.nvlink_efficiency
    assert 150 <= achieved <= 170  # DeepEP: ~160 GB/s maximum
