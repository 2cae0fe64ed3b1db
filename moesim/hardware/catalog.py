"""Finding and loading hardware profiles by name or path.

A name is looked up as ``<dir>/<name>.yaml`` in, in order: the directory given by the
``MOESIM_PROFILES`` environment variable, ``hardware_profiles/`` next to the scenario file or any
of its parents, ``hardware_profiles/`` in the working directory, and last the profiles shipped
as package data (``moesim/hardware/profiles/``), so an installed moesim finds them too.
"""

from __future__ import annotations

import os
from pathlib import Path

from moesim.config.validation import is_file, read_yaml, validate
from moesim.errors import ConfigError
from moesim.hardware.profile import HardwareProfile
from moesim.registry import closest, shorten

PROFILE_DIRNAME = "hardware_profiles"
SHIPPED_DIR = Path(__file__).parent / "profiles"


def profile_dirs(base_dir: Path | None = None) -> list[Path]:
    """Directories searched for profiles, most specific first, existing ones only."""
    found: list[Path] = []
    env = os.environ.get("MOESIM_PROFILES")
    if env:
        found.append(Path(env))
    if base_dir is not None:
        found += [d / PROFILE_DIRNAME for d in (base_dir.resolve(), *base_dir.resolve().parents)]
    found.append(Path.cwd() / PROFILE_DIRNAME)
    found.append(SHIPPED_DIR)
    unique: list[Path] = []
    for d in found:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def profile_names(base_dir: Path | None = None) -> list[str]:
    """Names of all profiles found, sorted."""
    return sorted({p.stem for d in profile_dirs(base_dir) for p in d.glob("*.yaml")})


def find_profile(ref: str, base_dir: Path | None = None) -> Path:
    """Path of the profile ``ref`` (a name or a path to a YAML file)."""
    direct = Path(ref)
    if direct.suffix in (".yaml", ".yml"):
        candidates = (
            [direct]
            if direct.is_absolute()
            else [(base_dir or Path.cwd()) / direct, Path.cwd() / direct]
        )
        for c in candidates:
            if is_file(c):
                return c
        raise ConfigError(None, "hardware", f"hardware profile file '{shorten(ref)}' not found")
    names = profile_names(base_dir)
    if ref in names:
        for d in profile_dirs(base_dir):
            if is_file(d / f"{ref}.yaml"):
                return d / f"{ref}.yaml"
    raise ConfigError(
        None,
        "hardware",
        f"unknown hardware profile '{shorten(ref)}'{closest(ref, names)}; "
        f"valid: {', '.join(names) or '(none found)'}",
    )


def load_profile(ref: str, base_dir: Path | None = None) -> HardwareProfile:
    """Load and validate the profile ``ref`` (every figure must cite a source)."""
    path = find_profile(ref, base_dir)
    return validate(HardwareProfile, read_yaml(path), path)
