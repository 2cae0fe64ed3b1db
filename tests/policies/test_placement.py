"""Placement invariants: every expert has a slot, slots split evenly, vocab round-trips."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.errors import MoesimError
from moesim.policies.placement import PLACEMENTS, make_placement


def test_contiguous_layout() -> None:
    p = make_placement("contiguous", np.ones((2, 16)), 4)
    assert p.slots_per_rank == 4
    assert p.slot_rank.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert (p.logcnt(16) == 1).all()
    log2phy = p.log2phy(16)
    assert (p.phy2log[0, log2phy[0, :, 0]] == np.arange(16)).all()


def test_contiguous_needs_divisible_experts() -> None:
    with pytest.raises(ValueError, match="divide"):
        make_placement("contiguous", np.ones((1, 10)), 4)


def test_unknown_placement_lists_valid_names() -> None:
    with pytest.raises(MoesimError, match="valid: contiguous"):
        PLACEMENTS.get("eplbx")


def test_broken_policy_is_caught() -> None:
    @PLACEMENTS.register("test-broken")
    def broken(loads: np.ndarray, ranks: int) -> np.ndarray:
        return np.zeros_like(loads, dtype=np.int64)  # every slot holds expert 0

    with pytest.raises(ValueError, match="without a slot"):
        make_placement("test-broken", np.ones((1, 8)), 2)
