"""Rewrite tests/golden/<scenario>.json from the shipped scenarios.

Usage: python -m tests.golden.regenerate [SCENARIO_NAME ...]   (default: every scenario)
"""

from __future__ import annotations

import sys

from moesim.config.loading import load_scenario
from moesim.results.writer import summary_json
from moesim.runner import simulate
from moesim.serving.run import simulate_serving
from tests.conftest import ROOT, SCENARIOS


def main() -> None:
    only = set(sys.argv[1:])
    for path in sorted(SCENARIOS.glob("*.yaml")):
        if only and path.stem not in only:
            continue
        out = ROOT / "tests" / "golden" / f"{path.stem}.json"
        r = load_scenario(path)
        if r.scenario.workload.mode == "serve":
            summary = simulate_serving(r).summary
        else:
            summary = simulate(r).summary
        out.write_text(summary_json(summary), encoding="utf-8")
        print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
