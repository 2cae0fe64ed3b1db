"""``moesim calibrate``: measure, fit, and write the raw file, its plot and a calibrated profile.

Outputs (nothing is overwritten; every file is written to a temporary name and renamed):

- ``<results>/<device>-<date>.json``: the raw measurements (:mod:`moesim.calibration.backends`)
  plus the fit and its held-out check per shape;
- ``<results>/<device>-<date>.html``: measured points and fitted curves (plotly);
- the profile ``--out``: the base profile with measured launch overhead, memory, matmul and host
  link efficiencies, and the expert tables, each citing the raw file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moesim import jsonout
from moesim.calibration.backends import get_backend
from moesim.calibration.fit import ExpertTimeTable, fit_cases
from moesim.calibration.measure import Progress
from moesim.calibration.plan import Plan, record_key
from moesim.errors import CalibrationError

HOLDOUT_TARGET = 0.10


@dataclass
class CalibrationResult:
    """What one calibration produced."""

    document: dict[str, Any]
    tables: dict[str, ExpertTimeTable]
    raw_path: Path
    plot_path: Path
    profile_path: Path

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per shape: key, cases, fit and held-out errors."""
        return [
            {"shape": key, **{k: v for k, v in fit.items() if k != "holdout"}}
            for key, fit in self.document["fit"].items()
        ]


def fit_document(doc: dict[str, Any]) -> dict[str, ExpertTimeTable]:
    """Fit every shape of a raw document; the fits and their checks are added to it."""
    by_shape: dict[str, list[dict[str, Any]]] = {}
    for r in doc["expert_ffn"]:
        by_shape.setdefault(record_key(r), []).append(r)
    tables, fits = {}, {}
    for key, records in by_shape.items():
        table, check = fit_cases(records)
        tables[key] = table
        first = records[0]
        fits[key] = {
            **{k: first[k] for k in ("hidden", "width", "matrices", "dtype")},
            "experts": len(first["counts"]),
            "cases": len(records),
            "tokens": table.tokens.tolist(),
            "seconds": table.seconds.tolist(),
            "overhead_s": table.overhead_s,
            **check,
            "holdout_within_target": check["holdout_max_abs_error"] <= HOLDOUT_TARGET,
        }
    doc["fit"] = fits
    return tables


def slug(text: str) -> str:
    """File-name form of a device name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "device"


def _free_path(folder: Path, stem: str, suffix: str) -> Path:
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file; refuse to overwrite."""
    if path.exists():
        raise CalibrationError(f"{path} exists; moesim never overwrites an earlier result")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_out_profile(out: Path) -> None:
    """A profile is written to a new ``.yaml`` file, never over an earlier one."""
    if out.exists():
        raise CalibrationError(
            f"{out} exists; moesim never overwrites a profile (choose another --out)"
        )
    if out.suffix not in (".yaml", ".yml"):
        raise CalibrationError(f"--out {out}: expected a .yaml file")


def calibrate(
    plan: Plan,
    backend: str,
    base_profile: Path,
    out_profile: Path,
    results_dir: Path,
    seed: int = 0,
    progress: Progress | None = None,
) -> CalibrationResult:
    """Measure ``plan`` with ``backend``, fit, and write the raw file, plot and profile."""
    check_out_profile(out_profile)
    doc = get_backend(backend, seed).measure(plan, progress)
    tables = fit_document(doc)
    stem = f"{slug(doc['device'])}-{doc['created'][:10]}"
    raw_path = _free_path(results_dir, stem, ".json")
    plot_path = raw_path.with_suffix(".html")
    from moesim.calibration.profile import calibrated_profile

    profile = calibrated_profile(base_profile, doc, out_profile, raw_path)
    write_atomic(raw_path, jsonout.dumps(doc, indent=1) + "\n")
    write_atomic(plot_path, plot_html(doc, tables))
    write_atomic(out_profile, yaml.safe_dump(profile, sort_keys=False, width=100))
    from moesim.hardware.catalog import load_profile

    load_profile(str(out_profile))  # the written profile must load (every figure cited)
    return CalibrationResult(doc, tables, raw_path, plot_path, out_profile)


def plot_html(doc: dict[str, Any], tables: dict[str, ExpertTimeTable]) -> str:
    """Measured uniform cases (per-expert time vs tokens per expert), uneven and held-out cases
    (measured vs predicted), and the fitted curves, one panel pair per shape."""
    from plotly.subplots import make_subplots

    from moesim.results.report import html_page

    figs = []
    for key, table in tables.items():
        records = [r for r in doc["expert_ffn"] if record_key(r) == key]
        fig = make_subplots(
            rows=1,
            cols=2,
            subplot_titles=(
                f"{key}: grouped call over {len(records[0]['counts'])} experts, uniform",
                "all cases: measured vs predicted",
            ),
        )
        uni = [r for r in records if r["label"].startswith("uniform")]
        x = np.array([r["counts"][0] for r in uni])
        fig.add_scatter(
            x=x,
            y=[r["seconds"] * 1e3 for r in uni],
            mode="markers",
            name="measured",
            row=1,
            col=1,
        )
        xs = np.unique(np.geomspace(1, x.max(), 200).round())
        e = len(uni[0]["counts"])
        fig.add_scatter(
            x=xs,
            y=table.predict(np.repeat(xs[:, None], e, axis=1)) * 1e3,
            mode="lines",
            name="fitted",
            row=1,
            col=1,
        )
        for held, name in ((False, "fitted cases"), (True, "held out")):
            rs = [r for r in records if r["holdout"] == held]
            fig.add_scatter(
                x=[r["seconds"] * 1e3 for r in rs],
                y=[float(table.predict(np.array(r["counts"]))) * 1e3 for r in rs],
                mode="markers",
                name=name,
                text=[r["label"] for r in rs],
                row=1,
                col=2,
            )
        top = max(r["seconds"] for r in records) * 1e3
        fig.add_scatter(x=[0, top], y=[0, top], mode="lines", name="y = x", row=1, col=2)
        fig.update_xaxes(type="log", title_text="tokens per expert", row=1, col=1)
        fig.update_yaxes(type="log", title_text="ms per call", row=1, col=1)
        fig.update_xaxes(title_text="measured ms", row=1, col=2)
        fig.update_yaxes(title_text="predicted ms", row=1, col=2)
        fig.update_layout(height=450)
        figs.append(fig)
    intro = (
        f"{doc['device']}, backend {doc['backend']}, {doc['created']}. Held-out check per "
        "shape: "
        + "; ".join(
            f"{k} max {v['holdout_max_abs_error']:.1%} over {v['holdout_cases']} cases"
            for k, v in doc["fit"].items()
        )
    )
    return html_page("moesim calibration", intro, figs)
