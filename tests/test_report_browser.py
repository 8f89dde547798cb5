"""The report in a real headless browser: it loads without errors and the DOM has every piece.

Skipped only where no Chromium binary is installed (``.ci/run`` installs
``chromium-headless-shell``). Set ``LEANSEG_SCREENSHOTS=DIR`` to keep the screenshots.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from leanseg.report import write_report
from tests.browser import Browser, find_browser

BINARY = find_browser()
pytestmark = pytest.mark.skipif(
    BINARY is None, reason="no Chromium binary on PATH (apt-get install chromium-headless-shell)"
)

PAGE_FACTS = """(() => {
  const images = [...document.images].map(i => ({
    complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}));
  const plots = [...document.querySelectorAll('svg[data-plot]')].map(s => {
    const box = s.getBoundingClientRect();
    return {name: s.dataset.plot, width: box.width, height: box.height,
            marks: s.querySelectorAll('rect, polyline, circle').length};
  });
  const rows = id => document.querySelectorAll(`#${id} tbody tr`).length;
  return {images, plots, perClass: rows('per-class'), comparison: rows('comparison'),
          external: document.querySelectorAll('script[src], link[href], img:not([src^="data:"])')
            .length};
})()"""


@pytest.fixture(scope="module")
def browser():
    opened = Browser(BINARY)
    yield opened
    opened.close()


def _keep(shot: Path) -> None:
    folder = os.environ.get("LEANSEG_SCREENSHOTS")
    if folder:
        shutil.copy(shot, Path(folder) / shot.name)


def _check_plots(facts: dict, expected: set[str]) -> None:
    assert expected <= {p["name"] for p in facts["plots"]}
    for plot in facts["plots"]:
        assert plot["width"] > 50 and plot["height"] > 50, plot
        assert plot["marks"] >= 1, plot  # bars, lines or points were drawn
    assert facts["external"] == 0


def test_single_run_report_in_a_browser(browser, finished_run, tmp_path):
    run = finished_run[0]
    classes = len(json.loads((run / "final_metrics.json").read_text())["iou"])
    assert browser.open(run / "report.html") == []
    facts = browser.evaluate(PAGE_FACTS)
    assert facts["perClass"] == classes
    assert len(facts["images"]) == len(list((run / "samples").glob("*.png"))) > 0
    for image in facts["images"]:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0
    _check_plots(facts, {"loss", "lr", "val", "per_class", "confusion"})
    shot = browser.screenshot(tmp_path / "report_single.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    _keep(shot)


def test_comparison_report_in_a_browser(browser, finished_run, tmp_path):
    second = tmp_path / "second"
    shutil.copytree(finished_run[0], second)
    out = write_report([finished_run[0], second], tmp_path / "compare.html")
    assert browser.open(out) == []
    facts = browser.evaluate(PAGE_FACTS)
    assert facts["comparison"] == 2
    _check_plots(facts, {"pareto_parameters", "pareto_memory"})
    _keep(browser.screenshot(tmp_path / "report_compare.png"))


def test_the_browser_check_sees_errors(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>console.error('boom'); undefinedCall();</script>")
    errors = browser.open(page)
    assert any("boom" in e for e in errors) and len(errors) >= 2
