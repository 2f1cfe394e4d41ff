"""Headless Chromium for the viewer tests: Debian's chromium driven by Playwright (no browser download)."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from atlas.view import serve_in_thread

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "data" / "test-artifacts"
# flags that keep a test browser offline and quiet (the profile is a fresh folder per test)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(), reason="chromium is not installed (apt-get install -y chromium)"
)


@contextlib.contextmanager
def served_page(folder: Path, profile: Path, viewport: dict[str, int]) -> Iterator[tuple[object, str, list[str]]]:
    """Serve `folder` on 127.0.0.1 and open a headless page: yields (page, url, errors seen by the page)."""
    from playwright.sync_api import sync_playwright

    server, url = serve_in_thread(folder)
    errors: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport=viewport
            )
            page = browser.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            try:
                yield page, url, errors
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()
