"""The notebooks run: every code cell of each notebook executes without error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_code_cells_run(path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    nb = json.loads(path.read_text())
    scope: dict[str, object] = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name}", "exec"), scope)
    assert os.getcwd() == str(ROOT)
    table = scope["table"]
    assert len(table) == 9  # type: ignore[arg-type]
    assert table["drop_rate"].iloc[0] >= table["drop_rate"].iloc[2]  # type: ignore[index]
