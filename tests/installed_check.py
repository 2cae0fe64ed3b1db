"""Check an installed (non-editable) moesim from outside the checkout (``make test-wheel``).

Run with the Python of a clean virtual environment holding only the built wheel and its
dependencies::

    .venv-wheel/bin/python tests/installed_check.py /path/to/checkout/scenarios

From a fresh temporary directory it runs a shipped scenario by path (its model preset and its
hardware profile found by name, as package data) and writes the run folder there, lists the
shipped profiles, and fails with a message when anything is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def main(scenarios: Path) -> None:
    """Run the checks; exit non-zero with a message on the first failure."""
    moesim = Path(sys.executable).with_name("moesim")
    with tempfile.TemporaryDirectory() as tmp:
        where = subprocess.run(
            [sys.executable, "-c", "import moesim; print(moesim.__file__)"],
            cwd=tmp,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if "site-packages" not in where:
            sys.exit(f"moesim was imported from {where}, not from the installed wheel")
        run = subprocess.run(
            [str(moesim), "run", str(scenarios / "quickstart.yaml"), "--out", "out", "--json"],
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        if run.returncode:
            sys.exit(f"moesim run failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
        summary = json.loads(run.stdout)
        runs = list((Path(tmp) / "out" / "quickstart").iterdir())
        if len(runs) != 1 or not (runs[0] / "report.html").is_file():
            sys.exit(f"no run folder with a report under {tmp}/out/quickstart: {runs}")
        listing = subprocess.run(
            [str(moesim), "profiles", "list"], cwd=tmp, capture_output=True, text=True
        )
        if listing.returncode or "h800" not in listing.stdout:
            sys.exit(f"moesim profiles list did not list the shipped profiles:\n{listing.stdout}")
    print(
        f"installed moesim ({where}): quickstart step {summary['step_time_s'] * 1e3:.3f} ms, "
        "run folder and report written, shipped profiles listed"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
