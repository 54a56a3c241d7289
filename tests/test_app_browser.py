"""End to end in a real browser, as a newcomer goes: the CLI demo first, then the UI's demo preset (a free
name, not a refusal) -> start from Setup -> live plots and samples -> stop -> resume -> runs -> export, then
a Flux demo through the form, then a dataset made from uploads and a caption edited.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package; skipped without them. Screenshots
of each tab go to $PPSF_SCREENSHOT_DIR (else the test's tmp folder); with PPSF_SCREENSHOTS=1 the Run tab is
also written to docs/run-page.png for the README.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from trainers.demo_world import shows_concept

pytest.importorskip("playwright")
from browser_helpers import free_port, launch_chromium, needs_chromium  # noqa: E402
from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
pytestmark = needs_chromium

# The run is far longer than the test: every phase waits for what it needs to see and then stops the run,
# so a fast machine cannot finish it before Stop, and a slow one never has to finish it.
MAX_STEPS = 5000
SAMPLE_EVERY = 10
FREEZE_AFTER = 20
STEPS_AFTER_RESUME = 10
RUN_TIMEOUT_MS = 120_000
CLI_DEMO_STEPS = 300  # the whole demo (about a minute): its last samples show the concept
FLUX_STEPS = 6
CLI_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The UI served in-process on a free port, runs and demo files in tmp; yields (url, runs folder)."""
    from app import runner
    from launch import LaunchSettings, launch

    tmp = tmp_path_factory.mktemp("ui")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PPSF_DEMO_DIR", str(tmp / "demo"))  # the trainer children inherit it
        patch.setenv("OMP_NUM_THREADS", "1")  # two OpenMP threads on a busy 2-core machine crawl
        _cli_demo(tmp / "runs")  # the README's first command, before the UI is opened
        port = free_port()
        demo = launch(LaunchSettings(port=port, runs_dir=tmp / "runs"), block=False)
        try:
            yield f"http://127.0.0.1:{port}/", tmp / "runs"
        finally:
            for run_dir in runner.running_runs(tmp / "runs"):
                runner.stop_run(run_dir)
                runner.wait_for_exit(run_dir, 60)
            demo.close()


def _cli_demo(runs_dir: Path) -> None:
    """`python -m trainers train presets/demo.toml`, shortened, into the runs folder the UI will serve."""
    overrides = [
        f"training.max_steps={CLI_DEMO_STEPS}",
        "sampling.every_n_steps=0",  # samples once, at the end
        f"output_dir={runs_dir}",
    ]
    command = [sys.executable, "-m", "trainers", "train", "presets/demo.toml"]
    command += [arg for override in overrides for arg in ("--set", override)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (runs_dir / "demo" / "config.toml").is_file()


@pytest.fixture(scope="module")
def browser_page(server):
    """(page, external request URLs) of a headless chromium that opened the UI."""
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # a busy 2-core machine queues a click's handler for seconds, and the page's renderer takes a core
        expect.set_options(timeout=30_000)
        page.set_default_timeout(60_000)
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


def _open_section(page: Page, key: str, title: str) -> None:
    page.locator(f"#section-{key}").get_by_text(f"{title} settings", exact=True).first.click()


def _tab(page: Page, tab_id: str) -> None:
    page.locator(f"button[data-tab-id={tab_id}]").click()


def _shots_folder(tmp_path: Path) -> Path:
    return Path(os.environ.get("PPSF_SCREENSHOT_DIR") or tmp_path / "screenshots")


def _load_preset(page: Page, name: str) -> None:
    page.locator("#preset input").click()
    page.get_by_role("option", name=name, exact=True).click()
    page.locator("#load-preset").click()
    expect(page.locator("#setup-message")).to_contain_text(f"Loaded preset {name}", timeout=30_000)


def _shot(page: Page, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


_DRAWN_LINES = """(id) => [...document.querySelectorAll(`#${id} .mark-line path`)]
    .filter(p => (p.getAttribute('d') || '').includes('L')).length"""


# the tick labels of a plot's x axis (SVG text has no innerText)
_X_TICKS = """(id) => [...document.querySelectorAll(`#${id} .role-axis`)]
    .filter(a => (a.getAttribute('aria-label') || '').startsWith('X-axis'))
    .flatMap(a => [...a.querySelectorAll('.role-axis-label text')].map(t => t.textContent))"""


def _wait_for_lines(page: Page, elem_id: str, count: int = 1) -> None:
    page.wait_for_function(f"({_DRAWN_LINES})('{elem_id}') >= {count}", timeout=RUN_TIMEOUT_MS)


def _stopped_step(run_dir: Path) -> int:
    from trainers.events import read_events

    stopped = [e for e in read_events(run_dir) if e["type"] == "stopped"]
    assert stopped, "no stopped event"
    assert 0 < stopped[-1]["step"] < MAX_STEPS
    return stopped[-1]["step"]


# with the module's fixtures: the CLI demo, the UI, three short trainings (674 s in a full run)
@pytest.mark.timeout(1500)
def test_newcomer_path_cli_demo_then_the_ui(browser_page, server, tmp_path):
    from trainers.checkpoint import list_checkpoints
    from trainers.events import read_events

    page, external = browser_page
    runs_dir = server[1]
    shots = _shots_folder(tmp_path)
    run_dir = runs_dir.resolve() / "demo-2"

    # Setup: the first screen holds what a user decides; the CLI's demo holds `demo`, so the preset gets demo-2
    for key in ("model.path", "dataset.path", "dataset.trigger_word", "name", "training.max_steps"):
        expect(_field(page, key)).to_be_visible()
    expect(page.locator("#setup-start")).to_be_visible()
    expect(page.locator("#setup-memory")).to_contain_text("Estimated peak", timeout=60_000)
    _load_preset(page, "demo")
    expect(_field(page, "name")).to_have_value("demo-2")
    expect(page.locator("#setup-message")).to_contain_text("demo already holds a run")
    # a bad value is refused before anything starts, and the refusal goes once the form changes
    _field(page, "training.max_steps").fill("-5")
    page.locator("#setup-start").click()
    expect(page.locator("#setup-message")).to_contain_text("Not started", timeout=30_000)
    expect(page.locator("#problems-training")).to_contain_text("training.max_steps")
    _field(page, "training.max_steps").fill(str(MAX_STEPS))
    expect(page.locator("#setup-message")).not_to_contain_text("Not started")
    _open_section(page, "sampling", "Sampling")
    _field(page, "sampling.every_n_steps").fill(str(SAMPLE_EVERY))
    _open_section(page, "optimizer", "Optimizer")
    _field(page, "optimizer.prodigy_steps").fill(str(FREEZE_AFTER))
    page.locator("#check").click()
    expect(page.locator("#setup-problems")).to_contain_text("Ready to train", timeout=60_000)
    expect(page.locator("#check-summary textarea")).to_have_value(re.compile("12 images"))
    page.evaluate("window.scrollTo(0, 0)")
    _shot(page, shots, "1-setup")

    # Dataset: thumbnails with captions, a bucket chart that draws its bar
    _tab(page, "dataset")
    page.locator("#scan-dataset").click()
    expect(page.locator("#dataset-summary")).to_contain_text("12 images", timeout=30_000)
    expect(page.locator("#dataset-gallery img").first).to_be_visible()
    bar = page.locator("#bucket-plot .mark-rect path").first
    expect(bar).to_be_visible()
    assert bar.bounding_box()["height"] > 50, "the bucket bar is drawn from 0, not as a zero-height line"
    _shot(page, shots, "2-dataset")

    # Start from Setup: the Run tab opens on the new run; plots and a sample appear; stop
    _tab(page, "setup")
    page.locator("#setup-start").click()
    expect(page.locator("#run-message")).to_contain_text("Started demo-2", timeout=30_000)
    expect(page.locator("#start")).to_be_visible()  # the Run tab is shown
    _wait_for_lines(page, "plot-loss", 2)  # raw and smoothed
    _wait_for_lines(page, "plot-d")
    expect(page.locator("#plot-lr")).to_be_hidden()  # lr = 1 in every group: d is the learning rate
    drawn = f"() => {{ const ticks = ({_X_TICKS})('plot-d'); return ticks.length ? ticks : null; }}"
    x_ticks = page.wait_for_function(drawn, timeout=RUN_TIMEOUT_MS).json_value()
    assert x_ticks and all(t.isdigit() for t in x_ticks), f"x ticks are whole steps: {x_ticks}"
    expect(page.locator("#plot-d")).to_contain_text("lr = 1")
    expect(page.locator("#samples img").first).to_be_visible(timeout=RUN_TIMEOUT_MS)
    expect(page.locator("#run-progress")).to_contain_text(re.compile(rf"step \d+/{MAX_STEPS}.*ETA"))
    page.locator("#stop").click()
    expect(page.locator("#run-title")).to_contain_text("stopped", timeout=RUN_TIMEOUT_MS)
    expect(page.locator("#run-progress")).not_to_contain_text("ETA")  # no stale ETA
    expect(page.locator("#run-message")).to_have_text("")  # nor "Stopping…"
    expect(page.locator("#log-tail textarea")).not_to_have_value(re.compile("Ctrl-C"))
    first_stop = _stopped_step(run_dir)
    assert list_checkpoints(run_dir)[-1][0] == first_stop
    _shot(page, shots, "3-run-stopped")

    # Resume: it continues from the checkpoint; d freezes (marked on the d plot); stop again
    page.locator("#resume").click()
    expect(page.locator("#run-message")).to_contain_text(f"Resuming demo-2 from step {first_stop}")
    target = max(first_stop, FREEZE_AFTER) + STEPS_AFTER_RESUME
    page.wait_for_function(
        f"""() => {{
            const m = document.querySelector('#run-progress').innerText.match(/step (\\d+)\\//);
            return m && Number(m[1]) >= {target};
        }}""",
        timeout=RUN_TIMEOUT_MS,
    )
    expect(page.locator("#run-title")).to_contain_text("running")
    expect(page.locator("#plot-d")).to_contain_text(f"d frozen at step {FREEZE_AFTER}")
    _wait_for_lines(page, "plot-d", 2)  # the group's d and the vertical freeze rule
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

    # Runs: both runs are listed; the UI's opens with its plots
    _tab(page, "runs")
    expect(page.locator("#runs-table")).to_contain_text(f"{second_stop}/{MAX_STEPS}", timeout=30_000)
    expect(page.locator("#runs-table")).to_contain_text(f"{CLI_DEMO_STEPS}/{CLI_DEMO_STEPS}")
    page.locator("#runs-open").click()
    expect(page.locator("#runs-summary")).to_contain_text("final d", timeout=30_000)
    _wait_for_lines(page, "runs-plot-loss", 2)
    _shot(page, shots, "5-runs")

    # the CLI demo's gallery: the concept it learned ("sks": magenta on cyan) is in what the page shows
    page.locator("#runs-choice input").click()
    page.get_by_role("option", name="demo", exact=True).click()
    page.keyboard.press("Escape")
    page.locator("#runs-open").click()
    expect(page.locator("#runs-config")).to_contain_text('name = "demo"', timeout=30_000)
    gallery = page.locator("#runs-samples img")
    expect(gallery).to_have_count(4, timeout=30_000)  # the four prompts, sampled at the last step
    shown = [page.request.get(img.get_attribute("src")).body() for img in gallery.all()]
    assert sum(shows_concept(Image.open(io.BytesIO(png)).convert("RGB")) for png in shown) >= 1
    _shot(page, shots, "5-runs-demo-gallery")

    # Export: the newest run with a checkpoint, kohya only; the file loads
    _tab(page, "export")
    expect(page.locator("#export-run input")).to_have_value("demo-2", timeout=30_000)
    expect(page.locator("#export-checkpoint input")).to_have_value(f"step {second_stop}", timeout=30_000)
    page.locator("#export-formats").get_by_label("diffusers").uncheck()
    page.locator("#export").click()
    result = page.locator("#export-result")
    expect(result).to_contain_text(".safetensors", timeout=60_000)
    paths = re.findall(r"(/\S+\.safetensors)", result.inner_text())
    assert (
        len(paths) == 1 and Path(paths[0]) == run_dir / "lora" / f"demo-2-step{second_stop:06d}.safetensors"
    )
    tensors = load_file(paths[0])
    assert tensors and all(t.numel() for t in tensors.values())
    expect(page.locator("#export-metadata")).to_contain_text("ss_steps")
    _shot(page, shots, "6-export")

    # Flux: the Flux demo preset, a few steps, LoRA targets typed as a module list; it trains to the end
    _tab(page, "setup")
    _load_preset(page, "demo-flux")
    _field(page, "training.max_steps").fill(str(FLUX_STEPS))
    _open_section(page, "flux", "Flux (model.family flux or flux2)")
    targets = _field(page, "flux.lora_targets")
    targets.fill("to_q, to_k, to_v")
    targets.press("Enter")
    page.locator("#setup-start").click()
    expect(page.locator("#run-message")).to_contain_text("Started demo-flux", timeout=30_000)
    expect(page.locator("#run-title")).to_contain_text("done", timeout=RUN_TIMEOUT_MS)
    _wait_for_lines(page, "plot-loss", 2)
    expect(page.locator("#samples img").first).to_be_visible(timeout=30_000)
    flux_events = read_events(runs_dir.resolve() / "demo-flux")
    assert [e["step"] for e in flux_events if e["type"] == "step"] == list(range(1, FLUX_STEPS + 1))
    flux_config = (runs_dir / "demo-flux" / "config.toml").read_text(encoding="utf-8")
    assert re.search(r'lora_targets = \[\s*"to_q",\s*"to_k",\s*"to_v",?\s*\]', flux_config), flux_config
    _shot(page, shots, "7-run-flux")

    # A dataset made from uploads becomes the Setup's dataset; a caption is edited in place
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    for index, colour in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), colour).save(uploads / f"img{index}.png")
    (uploads / "img0.txt").write_text("a red square", encoding="utf-8")
    _tab(page, "dataset")
    page.locator("#dataset-new").get_by_text("New dataset from uploaded images or a zip").click()
    page.locator("#dataset-name input, #dataset-name textarea").first.fill("my-squares")
    page.locator("#dataset-files input[type=file]").set_input_files(
        [str(uploads / "img0.png"), str(uploads / "img1.png"), str(uploads / "img0.txt")]
    )
    page.wait_for_timeout(500)  # the upload completes
    page.locator("#dataset-create").click()
    expect(page.locator("#dataset-create-message")).to_contain_text("2 images, 1 captions", timeout=30_000)
    folder = runs_dir.resolve().parent / "datasets" / "my-squares"
    expect(page.locator("#dataset-summary")).to_contain_text("2 images", timeout=30_000)
    page.locator("#dataset-gallery img").first.click()
    expect(page.locator("#caption-text textarea")).to_have_value("a red square")
    page.locator("#caption-text textarea").fill("a crimson square")
    page.locator("#caption-save").click()
    expect(page.locator("#caption-message")).to_contain_text("Saved img0.txt")
    assert (folder / "img0.txt").read_text(encoding="utf-8") == "a crimson square\n"
    _shot(page, shots, "8-dataset-made")

    assert external == [], "the page must work offline (no fonts or scripts from the internet)"
