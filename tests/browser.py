"""Headless Chromium for the page tests: the page's text as the browser laid it out, and a screenshot."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

BROWSER_TIMEOUT_S = 90
# As root in a container, without a GPU, and with no background connections to a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """The browser's executable, or the test is skipped (Debian's package is ``chromium``)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no headless Chromium on this machine (apt-get install chromium)")


def _run(page: Path, *options: str) -> subprocess.CompletedProcess:
    """Chromium on a file, with a profile of its own that is gone afterwards."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--hide-scrollbars",
                               *options, page.resolve().as_uri()], capture_output=True, text=True,
                              timeout=BROWSER_TIMEOUT_S, check=True)


def page_text(page: Path) -> str:
    """The DOM after Chromium parsed and laid out the page, tags dropped: what a reader's search finds."""
    from html.parser import HTMLParser

    class Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.parts: list[str] = []

        def handle_data(self, data: str) -> None:
            self.parts.append(data)

    parser = Text()
    parser.feed(_run(page, "--dump-dom").stdout)
    return " ".join(" ".join(parser.parts).split())


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 2400) -> Path:
    _run(page, f"--screenshot={png}", f"--window-size={width},{height}")
    return png


def distinct_colours(png: Path) -> int:
    """How many colours the screenshot shows (a blank or failed render shows one or two)."""
    from PIL import Image

    with Image.open(png) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 20) or ())
