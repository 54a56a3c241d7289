"""The UI side of issue 11 without a browser: the d-health banner, the live controls' requests, refusals and
acknowledgements, the Run page's validation plot, the Runs page's comparison and Export best."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from run_helpers import ui_context, write_run_folder

from app import events_view as view
from app import run_controls
from app.health_banner import banner_html, banner_markdown, health_warnings
from app.pages.common import UiContext
from trainers.control import CONTROL_DIR, ControlChannel

REPO = Path(__file__).resolve().parent.parent


def _ctx(tmp_path: Path) -> UiContext:
    return ui_context(tmp_path)


def _run(runs_dir: Path, name: str, events: list[dict], config: str | None = None) -> Path:
    return write_run_folder(runs_dir / name, events, config)


@pytest.fixture
def running(tmp_path):
    """A run folder whose trainer lock is held, as by a running trainer (this process holds it)."""
    run_dir = _run(tmp_path / "runs", "live", [{"type": "start", "step": 0, "total_steps": 10}])
    channel = ControlChannel(run_dir)
    channel.acquire()
    try:
        yield run_dir
    finally:
        channel.release()


# ---------------------------------------------------------------- the d-health banner
WARNINGS = [
    {
        "type": "warning",
        "code": "lr_not_one",
        "step": 0,
        "message": "optimizer.lr = 0.5 with Prodigy: d × 0.5",
    },
    {"type": "warning", "code": "image_skipped", "message": "skipped image a.png: broken"},
    {"type": "warning", "code": "d_stuck", "step": 30, "message": "d has not left d0 <1e-6> after 30 steps"},
    {"type": "warning", "code": "lr_not_one", "step": 40, "message": "repeated after a resume"},
]


def test_banner_shows_each_health_code_once_newest_first_in_words():
    shown = health_warnings(WARNINGS)
    assert [(w["code"], w["step"]) for w in shown] == [("lr_not_one", 40), ("d_stuck", 30)]
    html = banner_html(WARNINGS)
    assert html.index("The learning rate multiplies d") < html.index("d has not grown from d0")
    assert "d0 &lt;1e-6&gt;" in html  # a message is text, never markup
    assert "skipped image" not in html  # not a d-health warning: the status notices keep it
    assert banner_html([]) == ""
    assert (
        banner_markdown(WARNINGS)
        .splitlines()[0]
        .startswith("- ⚠ **The learning rate multiplies d** (step 40)")
    )


def test_status_notices_leave_health_warnings_to_the_banner():
    notices = view.notices_markdown(WARNINGS, "running")
    assert "skipped image a.png" in notices
    assert "Prodigy" not in notices and "d0" not in notices
    from app.run_view import RunSnapshot

    health_only = RunSnapshot(Path("r"), "running", True, [WARNINGS[0]], "", [])
    assert health_only.status_markdown() == ""  # not "No warnings." above a banner that shows one
    assert RunSnapshot(Path("r"), "running", True, [], "", []).status_markdown() == "No warnings."


def test_an_unknown_code_from_a_newer_trainer_is_spelled_out(monkeypatch):
    from app import health_banner

    monkeypatch.setattr(health_banner, "CODES", (*health_banner.CODES, "loss_spiky"))
    html = banner_html([{"type": "warning", "code": "loss_spiky", "step": 3, "message": "m"}])
    assert "Loss spiky" in html


# ---------------------------------------------------------------- live controls
def test_controls_are_refused_when_the_run_is_not_running(tmp_path):
    run_dir = _run(tmp_path / "runs", "idle", [{"type": "done", "step": 4}])
    for action in ("freeze", "sample", "checkpoint"):
        answer = run_controls.send(run_dir, action)
        assert answer.startswith("**Cannot") and "not running" in answer and "Resume" in answer
    assert "no run yet" in run_controls.send(None, "freeze")
    assert not (run_dir / CONTROL_DIR).exists()


def test_a_control_request_is_written_then_shown_waiting_then_acknowledged(running):
    answer = run_controls.send(running, "freeze")
    assert "**Freeze d** requested" in answer
    (request,) = list((running / CONTROL_DIR).glob("*.json"))
    assert json.loads(request.read_text())["action"] == "freeze"
    assert run_controls.pending_actions(running) == ["freeze"]
    waiting = run_controls.acknowledgements_markdown(running, [])
    assert "⏳ freeze d: waiting" in waiting
    # the trainer acts, writes its event, removes the request
    request.unlink()
    events = [
        {"type": "control", "step": 7, "action": "freeze", "status": "done", "message": "d frozen at 0.001"},
        {"type": "control", "step": 8, "action": "sample", "status": "refused", "message": "no prompts"},
    ]
    shown = run_controls.acknowledgements_markdown(running, events)
    lines = shown.splitlines()
    assert lines[1].startswith("- ✘ refused **sample** (step 8") and lines[1].endswith("no prompts")
    assert lines[2].startswith("- ✔ **freeze d** (step 7") and "waiting" not in shown


def test_stop_reaches_a_trainer_started_from_the_command_line(running, tmp_path):
    from app.pages.run import _stop

    answer = _stop(_ctx(tmp_path), str(running))  # no trainer.pid: the UI did not start it
    assert "**Stop** requested" in answer
    assert run_controls.pending_actions(running) == ["stop"]


# ---------------------------------------------------------------- Run page refresh
def test_run_page_refresh_draws_validation_banner_and_acknowledgements(tmp_path):
    from app import run_insight

    steps = [
        {"type": "step", "step": s, "loss": 1.0 / s, "groups": [{"name": "unet", "d": 1e-4, "lr": 1e-4}]}
        for s in range(1, 7)
    ]
    events = [{"type": "start", "step": 0, "total_steps": 6}, *steps]
    events += [
        {"type": "validation", "step": 3, "loss": 0.4},
        {"type": "validation", "step": 6, "loss": 0.45},
    ]
    events += [
        WARNINGS[2],
        {"type": "control", "step": 5, "action": "sample", "status": "done", "message": "ok"},
    ]
    run_dir = _run(tmp_path / "runs", "a", events)
    updates = list(run_insight._refresh(run_dir, "", ""))
    assert updates[0][5] is None  # the plot is cleared before its first series are drawn
    sig, key, acks, banner, box, frame, caption = updates[-1]
    assert set(frame["series"]) == {
        "training loss at y",
        "validation loss at x",
        "best validation: step 3",
    }
    assert box.visible is True and "step **3**" in caption
    assert "✔ **sample**" in acks and "d has not grown" in banner
    again = list(run_insight._refresh(run_dir, sig, key))
    assert len(again) == 1 and all(
        type(u).__name__ == "skip" or u == {"__type__": "update"} for u in again[0]
    )

    plain = _run(tmp_path / "runs", "b", events[:3])
    *_, last = run_insight._refresh(plain, "", "")
    assert last[4].visible is False and last[5] is None and "dataset.validation" in last[6]


# ---------------------------------------------------------------- Runs page comparison
def test_runs_page_compares_two_runs(tmp_path):
    from app.pages.runs import _compare

    ctx = _ctx(tmp_path)
    steps = [
        {"type": "step", "step": s, "loss": 0.5, "groups": [{"name": "unet", "d": 1e-3}]} for s in (1, 2)
    ]
    _run(ctx.runs_dir, "a", [*steps, {"type": "validation", "step": 2, "loss": 0.3}], "[lora]\nrank = 4\n")
    _run(ctx.runs_dir, "b", steps, "[lora]\nrank = 8\n")
    message, summary, loss, validation, d, caption, table = _compare(ctx, ["a", "b"])
    assert message.startswith("Comparing a, b")
    assert set(loss["run"]) == {"a", "b"} and set(validation["run"]) == {"a"}
    assert set(d["series"]) == {"a · unet", "b · unet"} and list(d["log10 d"]) == pytest.approx([-3.0] * 4)
    assert table.values.tolist() == [["lora.rank", "4", "8"]]
    assert summary.set_index("run").loc["a", "best validation loss"] == "0.3"
    assert "two or more" in _compare(ctx, ["a"])[0]
    assert "No run named" in _compare(ctx, ["a", "../etc"])[0]


# ---------------------------------------------------------------- Export best
def _config_for_export(run_dir: Path) -> None:
    import tomllib

    import tomli_w

    config = tomllib.loads((REPO / "presets" / "demo.toml").read_text(encoding="utf-8"))
    config["name"] = run_dir.name
    config["validation"] = {"every_n_steps": 5}
    (run_dir / "config.toml").write_text(tomli_w.dumps(config), encoding="utf-8")


def test_export_best_without_a_checkpoint_at_the_best_step_says_what_to_set(tmp_path):
    from app.best_export import best_summary
    from app.pages.export import _export_best

    ctx = _ctx(tmp_path)
    run_dir = _run(
        ctx.runs_dir,
        "a",
        [{"type": "validation", "step": 5, "loss": 0.2}, {"type": "validation", "step": 10, "loss": 0.3}],
    )
    _config_for_export(run_dir)
    assert best_summary(run_dir) == (
        "Best validation loss 0.2 at step 5: **no checkpoint of that step was kept**."
    )
    message, files, metadata = _export_best(ctx, "a", ["kohya"])
    assert message.startswith("⚠ Not exported:") and "step 5" in message
    assert "saving.every_n_steps" in message and files is None and metadata is None

    shutil.rmtree(run_dir)
    run_dir = _run(ctx.runs_dir, "a", [{"type": "step", "step": 1, "loss": 0.1, "groups": []}])
    _config_for_export(run_dir)
    assert "No validation results" in best_summary(run_dir)
    message, _, _ = _export_best(ctx, "a", ["kohya"])
    assert "no validation results" in message and "dataset.validation" in message


def test_the_pages_have_the_insight_widgets(tmp_path):
    from app.ui import build_ui

    demo = build_ui(runs_dir=tmp_path / "runs")
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    run_page = {"control-freeze", "control-sample", "control-checkpoint", "control-acks", "run-health"}
    run_page |= {"plot-validation", "validation-caption"}
    runs_page = {"compare-choice", "compare-go", "compare-summary", "compare-differences"}
    runs_page |= {"compare-plot-loss", "compare-plot-validation", "compare-plot-d"}
    assert run_page | runs_page | {"export-best", "export-best-info"} <= ids
