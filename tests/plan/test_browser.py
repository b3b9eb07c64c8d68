"""The HTML report in a real browser: headless Chromium (Debian's package) renders it, takes a
screenshot, and the test fails on any console message or on a plot without its lines.

Skips only when no chromium binary exists (scripts/install_chromium.sh, run by scripts/test.sh,
installs it where it can).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catalog.plan.html import write_html
from catalog.plan.planner import PlanRequest, build_plan
from catalog.plan.profile import DEFAULT_PROFILE
from catalog.plan.workload import synthetic_workload

BROWSER = next(
    (
        path
        for name in ("chromium", "chromium-browser", "google-chrome")
        if (path := shutil.which(name))
    ),
    None,
)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium binary on this machine")

#: Chromium logs every console message (log, warning, error, uncaught exception) like this.
CONSOLE = re.compile(r":CONSOLE[:(]\d+\)?\]? ?(.*)")
#: The policy colours of the curve plots (catalog.plan.html._PALETTE): LRU blue, Belady black.
LRU_BLUE = (0x1F, 0x77, 0xB4)


def _render(page: Path, screenshot: Path) -> list[str]:
    """Screenshot ``page``; return the console messages Chromium logged."""
    assert BROWSER is not None
    result = subprocess.run(
        [
            BROWSER,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-extensions",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1200,4000",
            f"--screenshot={screenshot}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert screenshot.exists(), result.stderr[-2000:]
    return [m.group(1) for line in result.stderr.splitlines() if (m := CONSOLE.search(line))]


def _pixels_like(image: np.ndarray, color: tuple[int, int, int], tolerance: int = 24) -> int:
    return int(
        (np.abs(image[..., :3].astype(int) - np.array(color)).max(axis=-1) <= tolerance).sum()
    )


def _plotted(screenshot: Path) -> tuple[int, int, int]:
    """Pixels that are not white, LRU-blue pixels, and near-black pixels."""
    image = np.asarray(Image.open(screenshot).convert("RGB"))
    not_white = int((image.min(axis=-1) < 240).sum())
    return not_white, _pixels_like(image, LRU_BLUE), _pixels_like(image, (0, 0, 0), 40)


def test_the_report_renders_with_its_plots_and_no_console_message(tmp_path: Path) -> None:
    workload = synthetic_workload(adapters=300, zipf=1.0, rate=20, duration_s=100, seed=4)
    plan = build_plan(workload, PlanRequest(slo_p99_ms=50, points=6, workers=1), DEFAULT_PROFILE)
    page = tmp_path / "plan.html"
    write_html(plan, page)
    screenshot = tmp_path / "plan.png"
    messages = _render(page, screenshot)
    assert messages == [], messages
    not_white, blue, black = _plotted(screenshot)
    assert not_white > 100_000  # text, tables and plots, not a blank page
    assert blue > 500, "the LRU curves are missing from the plots"
    assert black > 2_000, "Belady's curves and the axes are missing"


def test_the_checks_catch_a_console_error_and_a_blank_plot(tmp_path: Path) -> None:
    """The two checks above can fail: a script error is seen, an empty plot has no lines."""
    broken = tmp_path / "broken.html"
    broken.write_text(
        "<!DOCTYPE html><html><body><p>report</p>"
        "<svg width='600' height='300'></svg>"
        "<script>console.error('plot failed'); missing();</script></body></html>"
    )
    screenshot = tmp_path / "broken.png"
    messages = _render(broken, screenshot)
    assert any("plot failed" in m for m in messages), messages
    assert any("missing is not defined" in m for m in messages), messages
    _, blue, _ = _plotted(screenshot)
    assert blue <= 500
