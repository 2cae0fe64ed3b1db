"""The report check in a headless browser: what it needs and how it fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesim.results import screenshot


def test_no_browser_is_a_clear_error(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to find there
    with pytest.raises(FileNotFoundError, match="install Chromium"):
        screenshot.find_browser()
    report = tmp_path / "report.html"
    report.write_text("<html></html>")
    assert screenshot.main([str(report)]) == 2
    assert "no headless browser found" in capsys.readouterr().err


def test_a_missing_report_is_named(tmp_path: Path, capsys) -> None:
    assert screenshot.main([str(tmp_path / "nope.html")]) == 2
    assert "nope.html: no such report" in capsys.readouterr().err


def test_a_page_whose_figures_do_not_draw_fails(monkeypatch, tmp_path: Path) -> None:
    # A browser that runs no script: the page's figure is never drawn.
    report = tmp_path / "report.html"
    report.write_text('<div class="plotly-graph-div"></div>')
    fake = tmp_path / "chromium"
    fake.write_text(
        '#!/bin/sh\nfor a in "$@"; do case $a in --screenshot=*) : > "${a#--screenshot=}"'
        ' && printf x > "${a#--screenshot=}";; esac; done\necho "<html></html>"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert screenshot.figures_drawn(report, str(fake)) == (1, 0)
    assert screenshot.main([str(report), "--png", str(tmp_path / "shot.png")]) == 1
    assert (tmp_path / "shot.png").read_text() == "x"
