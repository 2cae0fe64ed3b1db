"""Render a report in a real headless browser: check that every figure drew, save a screenshot.

``python -m moesim.results.screenshot REPORT.html [--png OUT.png]`` (``make report-check`` runs
it on a fresh quick-start run). It needs Chromium (or Chrome) from the system's packages and
fails with a clear message without one. A figure counts as drawn when plotly.js, run by the
browser, has built its plot container; a page whose script did not run (a blocked CDN, a
broken page) draws none.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000"]


def find_browser() -> str:
    """The first Chromium-family browser on PATH."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError(
        f"no headless browser found (looked for {', '.join(BROWSERS)} on PATH); install "
        "Chromium from your system's packages, e.g. apt install chromium"
    )


def figures_drawn(report: Path, browser: str) -> tuple[int, int]:
    """``(figures in the page, figures the browser drew)``."""
    source = report.read_text(encoding="utf-8")
    dom = subprocess.run(
        [browser, *FLAGS, "--dump-dom", report.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return source.count('class="plotly-graph-div"'), dom.count("plot-container plotly")


def screenshot(report: Path, png: Path, browser: str, size: str = "1400,4000") -> None:
    """Save the rendered page (``size``: width,height in pixels) to ``png``."""
    png.parent.mkdir(parents=True, exist_ok=True)
    shot = [f"--window-size={size}", f"--screenshot={png.resolve()}", report.resolve().as_uri()]
    subprocess.run(
        [browser, *FLAGS, *shot],
        capture_output=True,
        timeout=120,
        check=True,
    )
    if not png.exists() or png.stat().st_size == 0:
        raise RuntimeError(f"{browser} wrote no screenshot to {png}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report.html (or a run folder holding one)")
    parser.add_argument("--png", type=Path, help="screenshot path (default: beside the report)")
    args = parser.parse_args(argv)
    report = args.report / "report.html" if args.report.is_dir() else args.report
    if not report.is_file():
        print(f"error: {report}: no such report", file=sys.stderr)
        return 2
    try:
        browser = find_browser()
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total, drawn = figures_drawn(report, browser)
    png = args.png or report.with_name("report.png")
    screenshot(report, png, browser)
    print(f"{report}: {drawn} of {total} figures drawn by {Path(browser).name}; screenshot {png}")
    if total == 0 or drawn < total:
        print("error: the browser did not draw every figure", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
