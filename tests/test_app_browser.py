"""End to end in a real browser: demo preset -> start -> live plots and samples -> stop -> resume -> export.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package; skipped without them. Screenshots
of each tab go to the test's tmp folder; with PPSF_SCREENSHOTS=1 the Run tab is also written to
docs/run-page.png for the README.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
from safetensors.torch import load_file

pytest.importorskip("playwright")
from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium"
)

# The run is far longer than the test: every phase waits for what it needs to see and then stops the run,
# so a fast machine cannot finish it before Stop, and a slow one never has to finish it.
MAX_STEPS = 5000
SAMPLE_EVERY = 10
FREEZE_AFTER = 20
STEPS_AFTER_RESUME = 40
RUN_TIMEOUT_MS = 120_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The UI served in-process on a free port, runs and demo files in tmp; yields (url, runs folder)."""
    from app import runner
    from launch import LaunchSettings, launch

    tmp = tmp_path_factory.mktemp("ui")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PPSF_DEMO_DIR", str(tmp / "demo"))  # the trainer children inherit it
        patch.setenv("OMP_NUM_THREADS", "1")  # two OpenMP threads on a busy 2-core machine crawl
        port = _free_port()
        demo = launch(LaunchSettings(port=port, runs_dir=tmp / "runs"), block=False)
        try:
            yield f"http://127.0.0.1:{port}/", tmp / "runs"
        finally:
            for run_dir in runner.running_runs(tmp / "runs"):
                runner.stop_run(run_dir)
                runner.wait_for_exit(run_dir, 60)
            demo.close()


@pytest.fixture(scope="module")
def browser_page(server):
    """(page, external request URLs) of a headless chromium that opened the UI."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        external: list[str] = []
        local = ("http://127.0.0.1", "data:", "blob:")
        page.on("request", lambda r: None if r.url.startswith(local) else external.append(r.url))
        # "load", not "networkidle": the refresh timer keeps the network busy forever
        page.goto(server[0], wait_until="load")
        page.wait_for_selector("#field-training-max_steps")
        yield page, external
        browser.close()


def _field(page: Page, key: str):
    section, _, name = key.rpartition(".")
    return page.locator(f"#field-{section or 'run'}-{name}").locator("input, textarea").first


def _open_section(page: Page, title: str) -> None:
    page.locator(f"#section-{title.lower()}").get_by_text(title, exact=True).first.click()


def _tab(page: Page, tab_id: str) -> None:
    page.locator(f"button[data-tab-id={tab_id}]").click()


def _shot(page: Page, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


_DRAWN_LINES = """(id) => [...document.querySelectorAll(`#${id} .mark-line path`)]
    .filter(p => (p.getAttribute('d') || '').includes('L')).length"""


def _wait_for_lines(page: Page, elem_id: str, count: int = 1) -> None:
    page.wait_for_function(f"({_DRAWN_LINES})('{elem_id}') >= {count}", timeout=RUN_TIMEOUT_MS)


def _stopped_step(run_dir: Path) -> int:
    from trainers.events import read_events

    stopped = [e for e in read_events(run_dir) if e["type"] == "stopped"]
    assert stopped, "no stopped event"
    assert 0 < stopped[-1]["step"] < MAX_STEPS
    return stopped[-1]["step"]


def test_train_stop_resume_export_in_browser(browser_page, server, tmp_path):
    from trainers.checkpoint import list_checkpoints
    from trainers.events import read_events

    page, external = browser_page
    runs_dir = server[1]
    shots = tmp_path / "screenshots"
    run_dir = runs_dir.resolve() / "demo"

    # Setup: pick the demo preset, shorten it, and see a bad value refused before anything starts
    page.locator("#preset input").click()
    page.get_by_role("option", name="demo", exact=True).click()
    page.locator("#load-preset").click()
    expect(page.locator("#setup-message")).to_contain_text("Loaded preset demo")
    _field(page, "training.max_steps").fill("-5")
    _tab(page, "run")
    page.locator("#start").click()
    expect(page.locator("#run-message")).to_contain_text("Not started", timeout=30_000)
    expect(page.locator("#run-message")).to_contain_text("training.max_steps")
    _tab(page, "setup")
    expect(page.locator("#problems-training")).to_contain_text("training.max_steps")
    _field(page, "training.max_steps").fill(str(MAX_STEPS))
    _open_section(page, "Sampling")
    _field(page, "sampling.every_n_steps").fill(str(SAMPLE_EVERY))
    _open_section(page, "Optimizer")
    _field(page, "optimizer.prodigy_steps").fill(str(FREEZE_AFTER))
    page.locator("#check").click()
    expect(page.locator("#setup-problems")).to_contain_text("Ready to train", timeout=60_000)
    expect(page.locator("#check-summary textarea")).to_have_value(re.compile("12 images"))
    _shot(page, shots, "1-setup")

    # Dataset: thumbnails with captions, bucket histogram
    _tab(page, "dataset")
    page.locator("#scan-dataset").click()
    expect(page.locator("#dataset-summary")).to_contain_text("12 images", timeout=30_000)
    expect(page.locator("#dataset-gallery img").first).to_be_visible()
    _shot(page, shots, "2-dataset")

    # Run: start, watch the plots and a sample appear, stop
    _tab(page, "run")
    page.locator("#start").click()
    expect(page.locator("#run-message")).to_contain_text("Started demo", timeout=30_000)
    _wait_for_lines(page, "plot-loss", 2)  # raw and smoothed
    _wait_for_lines(page, "plot-d")
    _wait_for_lines(page, "plot-lr")
    expect(page.locator("#samples img").first).to_be_visible(timeout=RUN_TIMEOUT_MS)
    expect(page.locator("#run-progress")).to_contain_text(re.compile(rf"step \d+/{MAX_STEPS}.*ETA"))
    page.locator("#stop").click()
    expect(page.locator("#run-title")).to_contain_text("stopped", timeout=RUN_TIMEOUT_MS)
    first_stop = _stopped_step(run_dir)
    assert list_checkpoints(run_dir)[-1][0] == first_stop
    _shot(page, shots, "3-run-stopped")

    # Resume: it continues from the checkpoint; d freezes (marked on the d and d·lr plots); stop again
    page.locator("#resume").click()
    expect(page.locator("#run-message")).to_contain_text(f"Resuming demo from step {first_stop}")
    target = max(first_stop, FREEZE_AFTER) + STEPS_AFTER_RESUME
    page.wait_for_function(
        f"""() => {{
            const m = document.querySelector('#run-progress').innerText.match(/step (\\d+)\\//);
            return m && Number(m[1]) >= {target};
        }}""",
        timeout=RUN_TIMEOUT_MS,
    )
    expect(page.locator("#run-title")).to_contain_text("running")
    expect(page.locator("#plot-d")).to_contain_text(
        f"d frozen at step {FREEZE_AFTER}", timeout=10_000
    )  # legend
    _wait_for_lines(page, "plot-d", 2)  # the group's d and the vertical freeze rule
    _wait_for_lines(page, "plot-lr", 2)
    page.wait_for_timeout(300)  # let the plots finish drawing
    run_page = _shot(page, shots, "4-run-resumed")
    if os.environ.get("PPSF_SCREENSHOTS") == "1":
        docs = REPO / "docs"
        docs.mkdir(exist_ok=True)
        (docs / "run-page.png").write_bytes(run_page.read_bytes())
    page.locator("#stop").click()
    expect(page.locator("#run-title")).to_contain_text("stopped", timeout=RUN_TIMEOUT_MS)
    second_stop = _stopped_step(run_dir)
    assert second_stop >= target
    events = read_events(run_dir)
    assert [e["step"] for e in events if e["type"] == "resumed"] == [first_stop]
    assert any(e["type"] == "freeze" for e in events)

    # Runs: the run is listed and opens with its plots
    _tab(page, "runs")
    expect(page.locator("#runs-table")).to_contain_text(f"{second_stop}/{MAX_STEPS}", timeout=30_000)
    page.locator("#runs-open").click()
    expect(page.locator("#runs-summary")).to_contain_text("final d", timeout=30_000)
    _wait_for_lines(page, "runs-plot-loss", 2)
    _shot(page, shots, "5-runs")

    # Export: kohya only, from the newest checkpoint; the file loads
    _tab(page, "export")
    expect(page.locator("#export-checkpoint input")).to_have_value(f"step {second_stop}", timeout=30_000)
    page.locator("#export-formats").get_by_label("diffusers").uncheck()
    page.locator("#export").click()
    result = page.locator("#export-result")
    expect(result).to_contain_text(".safetensors", timeout=60_000)
    paths = re.findall(r"(/\S+\.safetensors)", result.inner_text())
    assert len(paths) == 1 and Path(paths[0]) == run_dir / "lora" / f"demo-step{second_stop:06d}.safetensors"
    tensors = load_file(paths[0])
    assert tensors and all(t.numel() for t in tensors.values())
    expect(page.locator("#export-metadata")).to_contain_text("ss_steps")
    _shot(page, shots, "6-export")

    assert external == [], "the page must work offline (no fonts or scripts from the internet)"
