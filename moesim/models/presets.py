"""Bundled model presets (``moesim/models/presets/*.yaml``) and model resolution.

A scenario's ``model:`` is a preset name, a path to a Hugging Face ``config.json``, or a path to a
model YAML in the preset format.
"""

from __future__ import annotations

from pathlib import Path

from moesim.config.validation import is_file, read_json, read_yaml, validate
from moesim.errors import ConfigError
from moesim.models.hf_config import from_hf_config
from moesim.models.spec import ModelSpec
from moesim.registry import closest, shorten

PRESET_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    """Names of the bundled presets, sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> ModelSpec:
    """Load the bundled preset ``name``.

    Raises:
        ConfigError: no such preset (with the list of valid names).
    """
    path = PRESET_DIR / f"{name}.yaml"
    if name not in preset_names():
        names = preset_names()
        raise ConfigError(
            None,
            "model",
            f"unknown model preset '{shorten(name)}'{closest(name, names)}; "
            f"valid: {', '.join(names)}, or a path to a config.json or model YAML",
        )
    return validate(ModelSpec, read_yaml(path), path)


def resolve_model(ref: str, base_dir: Path | None = None) -> ModelSpec:
    """Resolve a scenario's ``model:`` value.

    Args:
        ref: Preset name, or a path (absolute, or relative to ``base_dir`` or the working
            directory) to a Hugging Face ``config.json`` or a model YAML.
        base_dir: Directory of the scenario file.
    """
    if not any(ch in ref for ch in "/\\") and not ref.endswith((".json", ".yaml", ".yml")):
        return load_preset(ref)
    path = Path(ref)
    if not path.is_absolute() and base_dir is not None and is_file(base_dir / path):
        path = base_dir / path
    if not is_file(path):
        raise ConfigError(None, "model", f"model file '{shorten(ref)}' not found")
    if path.suffix == ".json":
        return from_hf_config(read_json(path), path)
    return validate(ModelSpec, read_yaml(path), path)
