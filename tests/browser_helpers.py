"""What the tests that serve the UI share: a free local port and Debian's headless chromium (the browser
tests skip without it or without the playwright package)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
NO_CHROMIUM = "needs Debian's chromium: apt-get install -y chromium"
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=NO_CHROMIUM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
