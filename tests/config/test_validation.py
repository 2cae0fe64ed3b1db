"""Reading configuration files within limits: bombs, depth, encodings, sizes (issue 14)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from moesim.config.validation import MAX_DEPTH, read_json, read_yaml
from moesim.errors import ConfigError, ConfigErrors
from moesim.models.hf_config import from_hf_config

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


def _write(tmp_path: Path, text: str | bytes, name: str = "f.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_an_alias_bomb_is_refused_in_well_under_a_second(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than"):
        read_yaml(_write(tmp_path, BOMB))
    assert time.perf_counter() - start < 0.5


def test_a_few_aliases_are_fine(tmp_path: Path) -> None:
    assert read_yaml(_write(tmp_path, "a: &a {x: 1}\nb: *a\n")) == {"a": {"x": 1}, "b": {"x": 1}}


@pytest.mark.parametrize("depth", [MAX_DEPTH + 5, 1_000, 100_000])
def test_deep_nesting_is_refused(tmp_path: Path, depth: int) -> None:
    with pytest.raises(ConfigError, match="nest"):
        read_yaml(_write(tmp_path, "a: " + "[" * depth + "]" * depth))
    with pytest.raises(ConfigError, match="nest"):
        read_json(_write(tmp_path, "[" * depth + "]" * depth, "f.json"))


def test_block_nesting_is_refused(tmp_path: Path) -> None:
    text = "a:\n" + "".join("  " * i + "k:\n" for i in range(1, 100))
    with pytest.raises(ConfigError, match=f"deeper than {MAX_DEPTH}"):
        read_yaml(_write(tmp_path, text))


def test_non_utf8_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 6\)"):
        read_yaml(_write(tmp_path, b"name: \xff\xfe\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        read_yaml("/proc/self/mem")
    with pytest.raises(ConfigError, match="file not found"):
        read_yaml(tmp_path / ("x" * 300 + ".yaml"))
    with pytest.raises(ConfigError, match="larger than"):
        read_yaml(_write(tmp_path, "a: " + "x" * (5 * 2**20)))


def test_hf_config_numbers_given_as_text_are_named() -> None:
    cfg = {"hidden_size": "4096", "num_local_experts": 8, "first_k_dense_replace": "1"}
    with pytest.raises(ConfigErrors) as info:
        from_hf_config(cfg)
    fields = {e.field for e in info.value.errors}
    assert fields == {"hidden_size", "first_k_dense_replace"}
    with pytest.raises(ConfigError, match="expected a JSON object"):
        from_hf_config([1, 2])  # type: ignore[arg-type]
