"""What the tests that serve the UI share: a free local port (the trainer's own `free_port`) and Debian's
headless chromium (the browser tests skip without it or without the playwright package)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainers.distributed import free_port  # noqa: F401 (for the UI tests)

CHROMIUM = Path("/usr/bin/chromium")
NO_CHROMIUM = "needs Debian's chromium: apt-get install -y chromium"
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=NO_CHROMIUM)


def launch_chromium(playwright):
    """Headless chromium that reaches nothing but the served UI (no sandbox: CI runs as root)."""
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
        ],
    )
