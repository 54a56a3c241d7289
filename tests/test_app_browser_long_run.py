"""A long run's Run tab in a real browser: each plotted line stays under MAX_POINTS points, and a series
that appears later (the freeze rule) is drawn (the legend workaround in app/ui.py, _plot_resets).

Needs Debian's chromium (/usr/bin/chromium) and the playwright package; skipped without them.
"""

from __future__ import annotations

import json

import pytest

from app.events_view import MAX_POINTS
from trainers.events import EVENTS_FILE

pytest.importorskip("playwright")
from browser_helpers import free_port, launch_chromium, needs_chromium  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

pytestmark = needs_chromium
STEPS = 5_000
TIMEOUT_MS = 120_000
# points of each drawn line of a plot: one "L" per segment after the first point
_LINE_POINTS = """(id) => [...document.querySelectorAll(`#${id} .mark-line path`)]
    .map(p => p.getAttribute('d') || '').filter(d => d.includes('L')).map(d => d.split('L').length)"""


def _step(step: int) -> dict:
    d = min(1e-2, 1e-6 * 1.002**step)
    groups = [{"name": "unet", "d": d, "lr": d}, {"name": "text_encoder", "d": 2 * d, "lr": d}]
    loss = 0.9 if step % 1_777 == 0 else 0.1 + (step % 7) / 100  # a few spikes
    return {"type": "step", "step": step, "loss": loss, "groups": groups, "time": 1e9 + step / 10}


def _lines(page, elem_id: str) -> list[int]:
    return page.evaluate(f"({_LINE_POINTS})('{elem_id}')")


def test_a_long_run_draws_bounded_lines_and_a_later_freeze_rule(tmp_path, monkeypatch):
    from launch import LaunchSettings, launch

    monkeypatch.setenv("PPSF_DEMO_DIR", str(tmp_path / "demo"))
    run_dir = tmp_path / "runs" / "long"
    run_dir.mkdir(parents=True)
    events = [
        {"type": "start", "step": 0, "total_steps": 2 * STEPS},
        *[_step(s) for s in range(1, STEPS + 1)],
    ]
    path = run_dir / EVENTS_FILE
    path.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    port = free_port()
    demo = launch(LaunchSettings(port=port, runs_dir=tmp_path / "runs"), block=False)
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")  # not networkidle: the timer polls
            page.locator("button[data-tab-id=run]").click()
            for elem_id in ("plot-loss", "plot-d", "plot-lr"):
                page.wait_for_function(f"({_LINE_POINTS})('{elem_id}').length >= 2", timeout=TIMEOUT_MS)
                assert all(2 < points <= MAX_POINTS for points in _lines(page, elem_id)), elem_id
            frozen = [*(_step(s) for s in range(STEPS + 1, STEPS + 21))]
            frozen.append({"type": "freeze", "step": STEPS + 20, "since_step": STEPS + 20, "d": [1e-2, 2e-2]})
            with path.open("a", encoding="utf-8") as file:
                file.write("".join(json.dumps(e) + "\n" for e in frozen))
            for elem_id in ("plot-d", "plot-lr"):  # the group lines and the vertical freeze rule
                page.wait_for_function(f"({_LINE_POINTS})('{elem_id}').length >= 3", timeout=TIMEOUT_MS)
            assert f"d frozen at step {STEPS + 20}" in page.locator("#plot-d").inner_text()
            browser.close()
    finally:
        demo.close()
