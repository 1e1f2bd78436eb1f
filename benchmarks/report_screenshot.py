"""Render a run's report.html in headless Chromium to a PNG, to check the page as a browser shows it.

    PYTHONPATH=$PWD python benchmarks/report_screenshot.py outputs/demo/report/report.html /tmp/report.png

Needs a Chromium binary (Debian: ``apt-get install chromium``; not part of the project's setup). The
first screen is ``--height`` pixels tall (default 900: what a laptop shows without scrolling);
``--full`` takes the whole page instead (its height estimated from the page's length).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(html: str | Path, png: str | Path, *, width: int = 1200, height: int = 900) -> Path:
    """``png`` of ``html`` at ``width`` x ``height`` CSS pixels; raises when no browser or no PNG."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(BROWSERS)})")
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"{html} does not exist (run `selectmoe report` first)")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no first-run state, no lock files
        cmd = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png}",
            html.as_uri(),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not png.is_file():
        raise RuntimeError(f"{browser} exited {done.returncode} without {png}: {done.stderr[-2000:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("html", help="report.html")
    parser.add_argument("png", help="output PNG")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--full", action="store_true", help="the whole page, not the first screen")
    args = parser.parse_args(argv)
    height = args.height
    if args.full:  # embedded PNGs dominate the length; ~1 px per 60 bytes of base64 is generous
        height = max(height, Path(args.html).stat().st_size // 60)
    print(screenshot(args.html, args.png, width=args.width, height=height))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
