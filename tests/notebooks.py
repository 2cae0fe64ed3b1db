"""Run the notebooks in a real Jupyter kernel (nbclient), as make test and make notebooks do.

``python -m tests.notebooks OUT`` executes every notebook under ``notebooks/`` from the
repository root, writes each executed notebook rendered to ``OUT/<name>.html`` (nbconvert)
and ``OUT/times.json`` (wall seconds per notebook), prints the table, and (where the machine
has Chromium) checks in a headless browser that every figure of every page drew. The
notebooks in git carry no outputs; a notebook that fails stops the run at the failing cell.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600
DATA = ROOT.parent / "shared" / "data"
NEEDS_DATA = {"placement", "capacity"}
"""Notebooks that read the real routing data beside the project (``../shared/data``)."""


def execute(path: Path, extra_code: str = "") -> tuple[Any, float]:
    """Execute the notebook at ``path`` in a fresh kernel, from the repository root, with
    ``extra_code`` as one more cell at the end; return the executed notebook and its wall
    seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if extra_code:
        nb.cells.append(nbformat.v4.new_code_cell(extra_code))
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": ROOT}}
    )
    start = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - start


def last_output(nb: Any) -> str:
    """The text the last cell printed."""
    return "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")


def main(argv: list[str]) -> int:
    """Execute and render every notebook into ``argv[0]`` (default build/notebooks)."""
    from nbconvert import HTMLExporter

    # figures as HTML with plotly.js inlined once per notebook, so the pages draw offline
    os.environ["PLOTLY_RENDERER"] = "plotly_mimetype+notebook"
    out = Path(argv[0]) if argv else ROOT / "build" / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    for path in NOTEBOOKS:
        nb, seconds = execute(path)
        body, _ = HTMLExporter().from_notebook_node(nb)
        (out / f"{path.stem}.html").write_text(body, encoding="utf-8")
        times[path.stem] = round(seconds, 1)
        print(f"{path.stem:<14} {seconds:6.1f} s  -> {out / path.stem}.html", flush=True)
    (out / "times.json").write_text(json.dumps(times, indent=2) + "\n", encoding="utf-8")
    return _check_drawn(out)


def _check_drawn(out: Path) -> int:
    """Open every page in headless Chromium (when the machine has one): each figure must draw."""
    from moesim.results.screenshot import figures_drawn, find_browser

    try:
        browser = find_browser()
    except FileNotFoundError as e:
        print(f"figures not checked in a browser: {e}")
        return 0
    bad = 0
    for page in sorted(out.glob("*.html")):
        drawn, total = figures_drawn(page, browser)
        print(f"{page.name:<20} {drawn} of {total} figures drawn by {Path(browser).name}")
        bad += drawn != total
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
