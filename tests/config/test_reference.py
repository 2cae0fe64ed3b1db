"""The generated scenario reference (the docs site's scenario page) lists every setting."""

from __future__ import annotations

import re

from moesim.config.reference import reference_markdown
from moesim.config.scenario import Scenario


def _leaf_paths(model: type, prefix: str = "") -> set[str]:
    from pydantic import BaseModel

    out = set()
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        path = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _leaf_paths(ann, f"{path}.")
        else:
            out.add(path)
    return out


def test_every_scenario_setting_has_a_row_with_its_default() -> None:
    text = reference_markdown()
    rows = set(re.findall(r"^\| `([^`]+)` \|", text, re.M))
    assert _leaf_paths(Scenario) <= rows
    assert "| `workload.cuda_graphs` | boolean | `false` |" in text
    assert "| `workload.mode` | `decode` \\| `prefill` \\| `train` \\| `serve` | required |" in text
    assert "### `policies.overlap`" in text


def test_the_docs_hooks_take_readme_sections_whole() -> None:
    import importlib.util

    import pytest

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    mark = "<!-- readme: Validation against published measurements -->"
    page = hooks.on_page_markdown(f"# V\n\n{mark}")
    assert "moesim validate" in page and "<!--" not in page
    assert "## Benchmarks" not in page  # stops at the next section
    with pytest.raises(ValueError, match="no section"):
        hooks.readme_section("Not a section")
