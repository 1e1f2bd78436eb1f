"""The report as a browser shows it: headless Chromium renders report.html (skipped without Chromium)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "report_screenshot.py"


def _script():
    spec = importlib.util.spec_from_file_location("report_screenshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_renders_in_chromium(tmp_path):
    shot = _script()
    if shot.find_browser() is None:
        pytest.skip("no Chromium installed (apt-get install chromium)")
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(
        "<!doctype html><html><body style='margin:0;background:#fff'>"
        "<div style='width:600px;height:300px;background:#000'></div></body></html>"
    )
    png = shot.screenshot(page, tmp_path / "shot.png", width=800, height=600)
    pixels = np.asarray(Image.open(png).convert("L"))
    assert pixels.shape == (600, 800)
    # the black block is where the page put it, the rest is white: the page was rendered, not blank
    assert pixels[:300, :600].max() < 10 and pixels[310:, :].min() > 245 and pixels[:, 610:].min() > 245
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shot.screenshot(tmp_path / "missing.html", tmp_path / "x.png")
