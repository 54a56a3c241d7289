"""Issue 11 in a real browser: live controls acknowledged on a running demo run (with its d-health banner
and validation curve), then two demo runs compared on the Runs page, and Export of the best step.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package; skipped without them. Screenshots go
to the test's tmp folder (PPSF_SCREENSHOTS=1 also writes the comparison to docs/compare-runs.png).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("playwright")
from browser_helpers import free_port, launch_chromium, needs_chromium  # noqa: E402
from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "presets" / "demo.toml"
pytestmark = needs_chromium

SHORT_STEPS = 32  # the finished run: validated and checkpointed every 8 steps
VALIDATE_EVERY = 8
FREEZE_FROM = 24  # the running run's d has grown by then (it starts at d0 for a few steps)
LONG_STEPS = 5000  # the running one is stopped by the test long before its end
TIMEOUT_MS = 120_000
COMMON = [
    "dataset.validation=0.25",
    f"validation.every_n_steps={VALIDATE_EVERY}",
    "sampling.every_n_steps=0",
]


def _overrides(name: str, runs_dir: Path, steps: int, *extra: str) -> list[str]:
    return [f"name={name}", f"output_dir={runs_dir}", f"training.max_steps={steps}", *COMMON, *extra]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The UI served in-process on a free port, runs and demo files in tmp; yields (url, runs folder)."""
    from app import runner
    from launch import LaunchSettings, launch

    tmp = tmp_path_factory.mktemp("ui")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PPSF_DEMO_DIR", str(tmp / "demo"))  # the trainer children inherit it
        patch.setenv("OMP_NUM_THREADS", "1")
        port = free_port()
        demo = launch(LaunchSettings(port=port, runs_dir=tmp / "runs"), block=False)
        try:
            yield f"http://127.0.0.1:{port}/", (tmp / "runs").resolve()
        finally:
            for run_dir in runner.running_runs(tmp / "runs"):
                runner.abort_run(run_dir)
                runner.wait_for_exit(run_dir, 60)
            demo.close()


@pytest.fixture(scope="module")
def finished_run(server):
    """demo-a: a short run trained to its end from the command line."""
    runs_dir = server[1]
    command = [sys.executable, "-m", "trainers", "train", str(DEMO)]
    for override in _overrides(
        "demo-a", runs_dir, SHORT_STEPS, f"saving.every_n_steps={VALIDATE_EVERY}", "saving.keep_last=10"
    ):
        command += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return runs_dir / "demo-a"


@pytest.fixture(scope="module")
def controlled_run(server):
    """demo-b, started as the Run page's Start does; it differs from demo-a in d_coef and lr (lr != 1 also
    gives a d-health warning for the banner). The first test stops it."""
    from app import runner
    from trainers.config import load_config

    overrides = _overrides("demo-b", server[1], LONG_STEPS, "optimizer.d_coef=0.5", "optimizer.lr=0.5")
    return runner.start_run(load_config(DEMO, overrides))


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield page
        browser.close()


def _tab(page: Page, tab_id: str) -> None:
    page.locator(f"button[data-tab-id={tab_id}]").click()


def _shot(page: Page, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


_DRAWN_LINES = """(id) => [...document.querySelectorAll(`#${id} .mark-line path`)]
    .filter(p => (p.getAttribute('d') || '').includes('L')).length"""


def _wait_for_lines(page: Page, elem_id: str, count: int) -> None:
    page.wait_for_function(f"({_DRAWN_LINES})('{elem_id}') >= {count}", timeout=TIMEOUT_MS)


def _choose(page: Page, dropdown_id: str, *names: str) -> None:
    for name in names:
        page.locator(f"#{dropdown_id} input").click()
        page.get_by_role("option", name=name, exact=True).click()
    page.keyboard.press("Escape")


def test_live_controls_are_acknowledged_on_a_running_run(server, controlled_run, page, tmp_path):
    from trainers.checkpoint import list_checkpoints
    from trainers.events import read_events

    url, running = server[0], controlled_run
    shots = tmp_path / "screenshots"

    # Run page: the running run is shown; each control is acknowledged by the trainer
    page.goto(url, wait_until="load")  # not networkidle: the refresh timers poll forever
    _tab(page, "run")
    expect(page.locator("#run-title")).to_contain_text("demo-b", timeout=30_000)
    expect(page.locator("#run-title")).to_contain_text("running", timeout=TIMEOUT_MS)
    page.wait_for_function(
        f"""() => {{
            const m = document.querySelector('#run-progress').innerText.match(/step (\\d+)\\//);
            return m && Number(m[1]) >= {FREEZE_FROM};
        }}""",
        timeout=TIMEOUT_MS,
    )
    acks = page.locator("#control-acks")
    for action, acknowledged in (
        ("freeze", "d frozen at"),
        ("sample", "samples of step"),
        ("checkpoint", "checkpoint written"),
    ):
        page.locator(f"#control-{action}").click()
        expect(page.locator("#control-message")).to_contain_text("requested", timeout=30_000)
        expect(acks).to_contain_text(acknowledged, timeout=TIMEOUT_MS)
    events = read_events(running)
    freezes = [e for e in events if e["type"] == "freeze"]
    assert freezes and freezes[0]["rule"] == "manual"
    controls = {e["action"]: e for e in events if e["type"] == "control"}
    assert all(controls[a]["status"] == "done" for a in ("freeze", "sample", "checkpoint"))
    assert controls["checkpoint"]["step"] in [step for step, _ in list_checkpoints(running)]
    expect(page.locator("#run-health")).to_contain_text("The learning rate multiplies d")
    expect(page.locator("#plot-validation")).to_contain_text("best validation: step", timeout=TIMEOUT_MS)
    _wait_for_lines(page, "plot-validation", 3)  # training, validation, the best-step rule
    page.wait_for_timeout(300)
    _shot(page, shots, "1-run-controls")

    # Stop, then a control is refused with a clear message
    page.locator("#stop").click()
    expect(page.locator("#run-title")).to_contain_text("stopped", timeout=TIMEOUT_MS)
    page.locator("#control-freeze").click()
    expect(page.locator("#control-message")).to_contain_text("not running")


def test_two_runs_compared_and_the_best_step_exported(server, finished_run, controlled_run, page, tmp_path):
    from app import runner
    from trainers.events import read_events

    shots = tmp_path / "screenshots"
    if runner.trainer_pid(controlled_run) is not None:  # run alone, without the test that stops it
        runner.request_stop(controlled_run)
        assert runner.wait_for_exit(controlled_run, 120)
    page.goto(server[0], wait_until="load")

    # Runs page: compare the two runs
    _tab(page, "runs")
    _choose(page, "compare-choice", "demo-a", "demo-b")
    page.locator("#compare-go").click()
    expect(page.locator("#compare-message")).to_contain_text("Comparing", timeout=30_000)
    for plot in ("compare-plot-loss", "compare-plot-validation", "compare-plot-d"):
        _wait_for_lines(page, plot, 2)
    differences = page.locator("#compare-differences")
    for setting in ("optimizer.d_coef", "optimizer.lr", "training.max_steps"):
        expect(differences).to_contain_text(setting)
    expect(page.locator("#compare-summary")).to_contain_text("demo-a")
    page.wait_for_timeout(300)
    shots.mkdir(parents=True, exist_ok=True)
    comparison = shots / "2-compare.png"
    page.locator("#compare-section").screenshot(path=str(comparison))
    _shot(page, shots, "2-runs-page")
    if os.environ.get("PPSF_SCREENSHOTS") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        (REPO / "docs" / "compare-runs.png").write_bytes(comparison.read_bytes())

    # Export: the best-validation checkpoint of the finished run
    _tab(page, "export")
    _choose(page, "export-run", "demo-a")
    expect(page.locator("#export-best-info")).to_contain_text("its checkpoint is kept", timeout=30_000)
    page.locator("#export-best").click()
    result = page.locator("#export-result")
    expect(result).to_contain_text(".safetensors", timeout=60_000)
    validations = [e for e in read_events(finished_run) if e["type"] == "validation"]
    best = min(validations, key=lambda e: e["loss"])["step"]
    paths = re.findall(r"(/\S+\.safetensors)", result.inner_text())
    assert str(finished_run / "lora" / f"demo-a-step{best:06d}.safetensors") in paths
    _shot(page, shots, "3-export-best")
