"""The UI's logic without a browser: event views, the generated form, path checks, launch rules, and the
runner driving a real trainer child process on the demo preset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from app import config_form as form
from app import events_view as view
from app import runner
from app.dataset_view import dataset_overview
from app.export_view import checkpoint_choices, export_lora, exported_markdown, metadata_by_file
from app.path_checks import config_path_problems, file_problem, folder_problem, writable_file_problem
from app.run_view import resolve_run, runs_table, snapshot
from launch import LaunchError, main, parse_auth, settings_from_args
from trainers.checkpoint import list_checkpoints
from trainers.config import TrainConfig, validate_config
from trainers.events import read_events

REPO = Path(__file__).resolve().parent.parent
DEMO_PRESET = REPO / "presets" / "demo.toml"


# ---------------------------------------------------------------- events -> views
def _step(step: int, loss: float, d: float, seconds: float = 0.5) -> dict:
    groups = [{"name": "unet", "d": d, "lr": d}, {"name": "text_encoder", "d": d / 2, "lr": d / 4}]
    return {"type": "step", "step": step, "epoch": 0, "loss": loss, "groups": groups, "step_seconds": seconds}


@pytest.fixture
def events() -> list[dict]:
    return [
        {"type": "dataset", "images": 12, "missing_captions": 2, "skipped": []},
        {"type": "start", "step": 0, "total_steps": 10, "device": "cpu"},
        _step(1, 1.0, 1e-4),
        _step(2, 0.5, 2e-4),
        _step(3, 0.8, 4e-4),
        {"type": "freeze", "step": 3, "since_step": 3, "d": [4e-4, 2e-4], "rule": "prodigy_steps"},
        {"type": "warning", "message": "latents are not cached"},
        _step(4, 0.6, 4e-4),
    ]


def test_loss_frame_has_raw_and_debiased_ema(events):
    frame = view.loss_frame(events, smoothing=0.5)
    raw = frame[frame.series == "raw"]
    smooth = frame[frame.series != "raw"]
    assert list(raw.step) == [1, 2, 3, 4] and list(raw.loss) == [1.0, 0.5, 0.8, 0.6]
    # debiased EMA: the first value is the first loss, then weighted towards the newest
    assert smooth.loss.iloc[0] == pytest.approx(1.0)
    assert smooth.loss.iloc[1] == pytest.approx((0.25 * 1.0 + 0.5 * 0.5) / 0.75)
    assert set(smooth.series) == {"smoothed (EMA 0.5)"}


def test_d_and_lr_frames_per_group_with_the_freeze_rule(events):
    d = view.d_frame(events)
    assert set(d.series) == {"unet", "text_encoder", "d frozen at step 3"}
    assert list(d[d.series == "unet"].d) == [1e-4, 2e-4, 4e-4, 4e-4]
    rule = d[d.series == "d frozen at step 3"]
    assert list(rule.step) == [3, 3]
    assert (rule.d.min(), rule.d.max()) == (d.d.min(), d.d.max())  # spans the plotted values
    lr = view.lr_frame(events)
    assert list(lr[lr.series == "text_encoder"].lr) == pytest.approx([2.5e-5, 5e-5, 1e-4, 1e-4])
    assert view.freeze_step(events) == 3


def test_frames_without_steps_are_empty_and_numeric():
    assert view.freeze_step([]) is None
    for frame in (view.loss_frame([]), view.d_frame([])):
        assert frame.empty and str(frame.dtypes.iloc[0]) == "int64"


def test_repeated_steps_after_resume_are_counted_once(events):
    events = events + [{"type": "resumed", "step": 3}, _step(4, 0.7, 5e-4)]
    assert [e["step"] for e in view.step_events(events)] == [1, 2, 3, 4]
    assert view.step_events(events)[-1]["loss"] == 0.7


def test_progress_and_eta(events):
    progress = view.progress(events)
    assert (progress.step, progress.total) == (4, 10)
    assert progress.eta_seconds == pytest.approx(6 * 0.5)
    assert progress.fraction == pytest.approx(0.4)
    assert progress.text() == "step 4/10 (40%) · 0.50 s/step · ETA 3s"
    assert "<progress" in view.progress_html(progress)
    assert view.progress([]).text() == "waiting for the trainer to start"


def test_eta_uses_wall_clock_time_of_the_current_trainer_process():
    events = [
        {"type": "start", "step": 0, "total_steps": 100},
        {"type": "step", "step": 1, "time": 10.0, "step_seconds": 0.1},
        {"type": "step", "step": 2, "time": 1000.0, "step_seconds": 0.1},  # then stopped for a long while
        {"type": "start", "step": 0, "total_steps": 100},
        {"type": "step", "step": 3, "time": 2000.0, "step_seconds": 0.1},
        {"type": "step", "step": 4, "time": 2001.0, "step_seconds": 0.1},
        {"type": "sample", "step": 4},
        {"type": "step", "step": 5, "time": 2003.0, "step_seconds": 0.1},  # includes the sampling pause
    ]
    progress = view.progress(events)
    assert progress.seconds_per_step == pytest.approx(1.5)
    assert progress.eta_seconds == pytest.approx(95 * 1.5)


@pytest.mark.parametrize(("seconds", "text"), [(4.4, "4s"), (185, "3m 05s"), (7620, "2h 07m"), (-1, "0s")])
def test_format_duration(seconds, text):
    assert view.format_duration(seconds) == text


@pytest.mark.parametrize(
    ("last", "alive", "state"),
    [
        (None, True, "starting"),
        ({"type": "start"}, True, "running"),
        ({"type": "resumed", "step": 3}, True, "running"),
        ({"type": "done", "step": 10}, False, "done"),
        ({"type": "stopped", "step": 3}, False, "stopped"),
        ({"type": "error", "message": "boom"}, False, "crashed"),
        ({"type": "start"}, False, "interrupted"),
        (None, False, "not started"),
    ],
)
def test_run_state(last, alive, state):
    events = [{"type": "step", "step": 1}] + ([last] if last else [])
    assert view.run_state(events, alive) == state


def test_crash_text_names_the_error_and_the_checkpoint_to_resume(events):
    crashed = events + [
        {
            "type": "error",
            "message": "TrainingError: loss became nan at step 4",
            "last_checkpoint": "/runs/x/checkpoints/step-000002",
            "last_checkpoint_step": 2,
        }
    ]
    text = view.notices_markdown(crashed, view.run_state(crashed, alive=False))
    assert "Training failed" in text and "loss became nan at step 4" in text
    assert "step 2" in text and "step-000002" in text and "Resume" in text
    assert text.count("latents are not cached") == 1
    assert "2 images have no caption" in text
    early = [{"type": "error", "message": "OSError: no model", "last_checkpoint": None}]
    assert "starts the run over" in view.notices_markdown(early, "crashed")


def test_interrupted_and_stopped_texts(events):
    interrupted = events + [{"type": "checkpoint", "step": 4, "path": "/runs/x/checkpoints/step-000004"}]
    assert "step 4" in view.notices_markdown(interrupted, "interrupted")
    stopped = events + [{"type": "stopped", "step": 4, "message": "stopped on request; checkpoint saved"}]
    assert "Stopped at step 4" in view.notices_markdown(stopped, "stopped")


def test_samples_newest_first_and_only_existing(tmp_path):
    paths = [tmp_path / f"s{i}.png" for i in range(3)]
    for path in paths[:2]:
        path.write_bytes(b"png")
    events = [
        {"type": "sample", "step": 10, "paths": [str(paths[0])], "prompts": ["a cat"]},
        {"type": "sample", "step": 20, "paths": [str(paths[1]), str(paths[2])], "prompts": ["a dog", "gone"]},
    ]
    assert view.sample_images(events) == [
        (str(paths[1]), "step 20: a dog"),
        (str(paths[0]), "step 10: a cat"),
    ]


def test_run_summary_and_final_d(events):
    summary = view.run_summary(events, "running")
    assert (summary["step"], summary["total_steps"], summary["last_loss"]) == (4, 10, 0.6)
    assert summary["final_d"] == [4e-4, 2e-4]
    done = events + [{"type": "done", "step": 4, "final_d": [0.03], "exported": ["/x/a.safetensors"]}]
    assert view.final_d(done) == [0.03]
    assert view.format_d([0.0318177, 1e-4]) == "0.0318, 0.0001"


# ---------------------------------------------------------------- schema -> form -> config
def _leaf_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= _leaf_keys(annotation, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _demo_values() -> tuple[list[form.FieldSpec], list]:
    specs = form.form_fields()
    data, problems = form.read_toml(DEMO_PRESET)
    assert not problems
    return specs, form.values_from_config(data, specs)


def _set(specs: list[form.FieldSpec], values: list, key: str, value) -> list:
    values = list(values)
    values[[s.key for s in specs].index(key)] = value
    return values


def test_every_schema_field_is_in_the_form_with_help():
    specs = form.form_fields()
    assert {s.key for s in specs} == _leaf_keys(TrainConfig)
    assert len({s.elem_id for s in specs}) == len(specs)
    assert all(s.info for s in specs), [s.key for s in specs if not s.info]
    assert [key for key, _ in form.SECTIONS] == list(dict.fromkeys(s.section for s in specs))


def test_widget_kinds_follow_the_types():
    kinds = {s.key: s for s in form.form_fields()}
    assert kinds["dataset.shuffle_tags"].kind == "checkbox"
    assert kinds["training.precision"].kind == "dropdown"
    assert kinds["training.precision"].choices == ("bf16", "fp16", "fp32")
    assert kinds["lora.rank"].kind == "number" and kinds["lora.rank"].integer
    assert kinds["optimizer.d0"].kind == "number" and not kinds["optimizer.d0"].integer
    assert kinds["training.max_steps"].kind == "optional_number"
    assert kinds["dataset.path"].kind == "text" and kinds["dataset.path"].required
    assert kinds["sampling.prompts"].kind == "lines"
    assert kinds["saving.formats"].kind == "choices"
    assert kinds["optimizer.betas"].kind == "numbers"
    assert kinds["optimizer.prodigy_steps"].kind == "scalar"
    assert "Prodigy" in kinds["optimizer.lr"].info


def test_demo_preset_round_trips_through_the_form():
    specs, values = _demo_values()
    config, problems = form.validate_values(values, specs)
    assert problems == []
    data, _ = form.read_toml(DEMO_PRESET)
    assert config.model_dump() == validate_config(data).model_dump()
    assert form.values_from_config(config, specs) == form.values_from_config(config.model_dump(), specs)


@pytest.mark.parametrize(
    ("key", "typed", "path", "expected"),
    [
        ("training.max_steps", 123, ("training", "max_steps"), 123),
        ("training.max_steps", "77", ("training", "max_steps"), 77),
        (
            "sampling.prompts",
            "a red cat, sitting\n\n a dog ",
            ("sampling", "prompts"),
            ["a red cat, sitting", "a dog"],
        ),
        ("optimizer.prodigy_steps", "auto", ("optimizer", "prodigy_steps"), "auto"),
        ("optimizer.prodigy_steps", "0.25", ("optimizer", "prodigy_steps"), 0.25),
        ("optimizer.eps", "atan2", ("optimizer", "eps"), "atan2"),
        ("optimizer.betas", "0.95, 0.999", ("optimizer", "betas"), (0.95, 0.999)),
        ("dataset.trigger_word", "", ("dataset", "trigger_word"), None),
        ("saving.formats", ["kohya"], ("saving", "formats"), ["kohya"]),
        ("dataset.shuffle_tags", True, ("dataset", "shuffle_tags"), True),
    ],
)
def test_changing_a_form_value_changes_the_config(key, typed, path, expected):
    specs, values = _demo_values()
    config, problems = form.validate_values(_set(specs, values, key, typed), specs)
    assert problems == []
    section, name = path
    assert getattr(getattr(config, section), name) == expected


@pytest.mark.parametrize(
    ("key", "typed", "problem_start"),
    [
        ("training.max_steps", "-5", "training.max_steps:"),
        ("dataset.resolution", 100, "dataset.resolution:"),
        ("optimizer.betas", "0.9, abc", "optimizer.betas:"),
        ("optimizer.prodigy_steps", "1.5", "optimizer.prodigy_steps"),
        ("name", "", "name:"),
        ("name", "a/b", "name:"),
        ("model.path", "", "model.path:"),
    ],
)
def test_a_bad_value_gives_the_fields_problem(key, typed, problem_start):
    specs, values = _demo_values()
    config, problems = form.validate_values(_set(specs, values, key, typed), specs)
    assert config is None
    assert [p for p in problems if p.startswith(problem_start)], problems
    section = key.split(".")[0] if "." in key else form.RUN_SECTION
    assert form.problems_by_section(problems)[section]


def test_section_level_problems_land_in_their_section():
    specs, values = _demo_values()
    values = _set(specs, values, "training.epochs", "3")  # and max_steps is set too
    _, problems = form.validate_values(values, specs)
    assert form.problems_by_section(problems)["training"] == problems
    assert form.problem_section("optimizer.fused_back_pass steps inside each backward pass") == "optimizer"
    assert form.problem_section("something else") == "run"


def test_partial_config_gets_defaults_and_unknown_keys_are_reported():
    specs = form.form_fields()
    values = form.values_from_config({"name": "x"}, specs)
    by_key = dict(zip([s.key for s in specs], values))
    assert by_key["lora.rank"] == 32 and by_key["dataset.path"] == "" and by_key["training.max_steps"] == ""
    _, problems = form.validate_dict({"name": "x", "trainig": {}})
    assert any("trainig: unknown key" in p for p in problems)


def test_list_presets_and_bad_toml(tmp_path):
    assert "demo" in form.list_presets(REPO / "presets")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ", encoding="utf-8")
    assert form.read_toml(bad)[1][0].startswith(f"{bad}: not valid TOML")


# ---------------------------------------------------------------- path checks
def test_folder_and_file_checks(tmp_path):
    file = tmp_path / "a.toml"
    file.write_text("x = 1")
    assert folder_problem(tmp_path) is None
    assert "does not exist" in folder_problem(tmp_path / "nope", "dataset.path")
    assert "is a file" in folder_problem(file)
    assert "no path given" in folder_problem("  ")
    assert file_problem(file, suffixes=(".toml",)) is None
    assert "is a folder" in file_problem(tmp_path)
    assert "not a .json" in file_problem(file, suffixes=(".json",))
    assert "does not exist" in file_problem(tmp_path / "missing.toml")
    assert writable_file_problem(tmp_path / "new.toml", suffixes=(".toml",)) is None
    assert "does not exist" in writable_file_problem(tmp_path / "no" / "new.toml")
    assert "must end in .toml" in writable_file_problem(tmp_path / "new.txt", suffixes=(".toml",))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_unreadable_folder_is_reported(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        assert "cannot be read" in folder_problem(locked)
    finally:
        locked.chmod(0o755)


def test_config_paths_are_checked(tmp_path):
    config = validate_config(
        {
            "name": "x",
            "model": {"path": "demo://tiny-sdxl"},
            "dataset": {"path": str(tmp_path)},
            "training": {"max_steps": 1},
        }
    )
    assert config_path_problems(config) == []


# ---------------------------------------------------------------- dataset tab
def test_dataset_overview(tmp_path):
    from trainers.tiny_models import write_demo_dataset

    root = write_demo_dataset(tmp_path / "data", num_images=5)
    (root / "broken.png").write_bytes(b"not a png")
    overview = dataset_overview(str(root), ".txt", 64, 2.0, True)
    assert overview.problem is None
    assert "5 images" in overview.summary
    assert len(overview.thumbnails) == 5 and all(caption for _, caption in overview.thumbnails)
    assert overview.buckets.images.sum() == 5
    assert list(overview.skipped.file) == [str(root / "broken.png")]
    assert "does not exist" in dataset_overview(str(tmp_path / "nope")).problem
    assert "unknown demo dataset" in dataset_overview("demo://cats").problem


def test_dataset_overview_shows_scan_warnings_and_bounds_the_aspect(tmp_path):
    from PIL import Image

    from trainers.tiny_models import write_demo_dataset

    root = write_demo_dataset(tmp_path / "data", num_images=2)
    (root / "0_skipped").mkdir()
    Image.new("RGB", (8, 8)).save(root / "0_skipped" / "left-out.png")
    Image.new("RGB", (2000, 100)).save(root / "strip.png")
    overview = dataset_overview(str(root), ".txt", 64, 2.0, True)
    assert "0_skipped" in overview.summary and "strip.png" in overview.summary
    # an unbounded aspect once hung the scan; the tab answers with the field's limit instead
    assert (
        "dataset.max_aspect must be between 1 and 8" in dataset_overview(str(root), ".txt", 64, 1e30).problem
    )


# ---------------------------------------------------------------- launch rules
def test_launch_defaults_to_localhost_without_auth():
    settings = settings_from_args([], env={})
    assert (settings.host, settings.port, settings.share, settings.auth) == ("127.0.0.1", 7860, False, None)


def test_listen_and_share_need_auth():
    for flag in ("--listen", "--share"):
        with pytest.raises(LaunchError, match="--auth user:password"):
            settings_from_args([flag], env={})
    settings = settings_from_args(["--listen", "--auth", "me:se:cret", "--port", "8000"], env={})
    assert (settings.host, settings.port, settings.auth) == ("0.0.0.0", 8000, ("me", "se:cret"))
    from_env = settings_from_args(["--listen", "--share"], env={"PPSF_AUTH": "u:p"})
    assert from_env.auth == ("u", "p") and from_env.share
    assert settings_from_args(["--auth", "u:p"], env={}).host == "127.0.0.1"


@pytest.mark.parametrize("text", ["nopassword", ":p", "u:"])
def test_bad_auth_is_refused(text):
    with pytest.raises(LaunchError):
        parse_auth(text)


def test_main_refuses_listen_without_auth_with_a_message(monkeypatch, capsys):
    monkeypatch.delenv("PPSF_AUTH", raising=False)
    assert main(["--listen"]) == 2
    assert "needs a login" in capsys.readouterr().err


# ---------------------------------------------------------------- runner: a real trainer child process
def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


DEMO_STEPS = 200


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Start the demo preset as a child, stop it mid-run, resume it to the end; returns what was seen."""
    tmp = tmp_path_factory.mktemp("runner")
    data, _ = form.read_toml(DEMO_PRESET)
    data["output_dir"] = str(tmp / "runs")
    data["training"]["max_steps"] = DEMO_STEPS  # long enough that Stop lands mid-run
    data["sampling"]["every_n_steps"] = 0  # sample only at the end: keeps the test short
    data["saving"]["every_n_steps"] = 0
    config = validate_config(data)
    seen: dict = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PPSF_DEMO_DIR", str(tmp / "demo"))
        # one thread: two OpenMP threads on a busy 2-core machine ran the demo 40x slower
        patch.setenv("OMP_NUM_THREADS", "1")
        run_dir = runner.start_run(config)
        try:
            seen["pid"] = runner.trainer_pid(run_dir)
            seen["state_while_running"] = snapshot(run_dir).state
            _wait_for(lambda: any(e["type"] == "step" for e in read_events(run_dir)), 120, "the first step")
            with pytest.raises(runner.RunnerError, match="already running"):
                runner.start_run(config)
            runs_dir = tmp / "runs"
            seen["refusals"] = [
                runner.one_at_a_time_refusal(runs_dir, allow_parallel=False),
                runner.one_at_a_time_refusal(runs_dir, allow_parallel=False, run_dir=run_dir),
                runner.one_at_a_time_refusal(runs_dir, allow_parallel=True),
            ]
            with pytest.raises(runner.RunnerError, match="still running"):
                runner.resume_run(run_dir)
            seen["stop_sent"] = runner.stop_run(run_dir)
            seen["exited"] = runner.wait_for_exit(run_dir, 120)
            seen["after_stop"] = read_events(run_dir)
            seen["checkpoints_after_stop"] = [step for step, _ in list_checkpoints(run_dir)]
            seen["state_after_stop"] = snapshot(run_dir).state
            seen["second_stop"] = runner.stop_run(run_dir)
            runner.resume_run(run_dir)
            seen["resumed_exited"] = runner.wait_for_exit(run_dir, 420)
        finally:
            if runner.trainer_pid(run_dir) is not None:
                runner.stop_run(run_dir)
                runner.wait_for_exit(run_dir, 60)
    seen["run_dir"] = run_dir
    seen["runs_dir"] = tmp / "runs"
    return seen


@pytest.mark.timeout(900)  # includes the demo_run fixture: a real 200-step run, stopped and resumed
def test_runner_stop_writes_a_checkpoint_and_resume_finishes(demo_run):
    run_dir = demo_run["run_dir"]
    assert demo_run["pid"] is not None
    assert demo_run["state_while_running"] in ("starting", "running")
    other, itself, parallel = demo_run["refusals"]
    assert "demo is still training" in other and "one at a time" in other
    assert itself is None and parallel is None
    assert demo_run["stop_sent"] and demo_run["exited"]
    stopped = [e for e in demo_run["after_stop"] if e["type"] == "stopped"]
    assert stopped and 0 < stopped[-1]["step"] < DEMO_STEPS
    assert demo_run["checkpoints_after_stop"][-1] == stopped[-1]["step"]
    assert demo_run["state_after_stop"] == "stopped"
    assert demo_run["second_stop"] is False  # nothing left to stop
    assert not (run_dir / runner.PID_FILE).exists()
    assert demo_run["resumed_exited"]
    events = read_events(run_dir)
    assert events[-1]["type"] == "done" and events[-1]["step"] == DEMO_STEPS
    assert any(e["type"] == "resumed" for e in events)
    assert snapshot(run_dir).state == "done"
    assert f"Finished** at step {DEMO_STEPS}" in snapshot(run_dir).status_markdown()
    log = runner.log_tail(run_dir, 200)
    assert "-m trainers train" in log and "-m trainers resume" in log
    assert log.count("trainer exited with code 0") == 2
    assert (run_dir / runner.REQUEST_FILE).is_file() and (run_dir / "config.toml").is_file()


@pytest.mark.timeout(900)  # may be the first to set up demo_run
def test_runs_table_and_export(demo_run):
    runs_dir, run_dir = demo_run["runs_dir"], demo_run["run_dir"]
    table = runs_table(runs_dir)
    assert (
        list(table.run) == ["demo"]
        and table.state[0] == "done"
        and table.steps[0] == f"{DEMO_STEPS}/{DEMO_STEPS}"
    )
    assert table["final d"][0]
    assert resolve_run(runs_dir, "demo") == run_dir
    assert resolve_run(runs_dir, "../demo") is None and resolve_run(runs_dir, "nope") is None
    choices = checkpoint_choices(run_dir)
    assert choices[0] == (f"step {DEMO_STEPS}", DEMO_STEPS)
    written = export_lora(run_dir, DEMO_STEPS, ["kohya"])
    assert (
        len(written) == 1 and written[0].path.is_file() and written[0].metadata["ss_steps"] == str(DEMO_STEPS)
    )
    assert str(written[0].path) in exported_markdown(written)
    assert metadata_by_file(written)[written[0].path.name]["ss_steps"] == str(DEMO_STEPS)
    with pytest.raises(ValueError, match="at least one format"):
        export_lora(run_dir, DEMO_STEPS, [])
    saved = {step for step, _ in list_checkpoints(run_dir)}
    missing = next(
        step for step in range(1, DEMO_STEPS) if step not in saved
    )  # the stop step varies with timing
    with pytest.raises(FileNotFoundError, match=f"no checkpoint at step {missing}"):
        export_lora(run_dir, missing, ["kohya"])


def test_preflight_refuses_an_existing_run_folder_and_another_output_dir(demo_run, tmp_path):
    from app.preflight import preflight

    data, _ = form.read_toml(DEMO_PRESET)
    data["output_dir"] = str(demo_run["runs_dir"])
    problems, summary = preflight(validate_config(data), demo_run["runs_dir"])
    assert any(p.startswith("name: run folder") for p in problems)
    assert "12 images" in summary
    problems, _ = preflight(validate_config(data), tmp_path)
    assert any(p.startswith("output_dir:") for p in problems)


def test_log_tail_collapses_progress_redraws(tmp_path):
    (tmp_path / runner.LOG_FILE).write_text("start\nstep 1\rstep 2\rstep 3\ndone\n", encoding="utf-8")
    assert runner.log_tail(tmp_path) == "start\nstep 3\ndone"
    assert runner.log_tail(tmp_path, lines=1) == "done"
    assert runner.log_tail(tmp_path / "none") == ""


def test_a_restarted_ui_finds_a_running_trainer_by_its_pid_file(tmp_path):
    # not started by this process (as after a UI restart): only the pid file and /proc say it runs
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "trainers"])
    try:
        (tmp_path / runner.PID_FILE).write_text(json.dumps({"pid": child.pid}))
        assert runner.trainer_pid(tmp_path) == child.pid
        assert runner.stop_run(tmp_path, signal.SIGTERM)
        child.wait(10)
        assert runner.trainer_pid(tmp_path) is None
    finally:
        child.kill()
        child.wait()


def test_a_pid_of_another_program_is_not_a_trainer(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / runner.PID_FILE).write_text(json.dumps({"pid": other.pid}))
        assert runner.trainer_pid(tmp_path) is None
    finally:
        other.kill()
        other.wait()


def test_a_stale_pid_file_means_not_running(tmp_path):
    (tmp_path / runner.PID_FILE).write_text('{"pid": 999999999}')
    assert runner.trainer_pid(tmp_path) is None
    assert not (tmp_path / runner.PID_FILE).exists()


FAKE_PID = 2**22 + 1  # above Linux's largest pid: nothing real is ever signalled


class _RecordingPopen:
    """Stands in for subprocess.Popen: records what the runner hands it, starts nothing."""

    calls: list[tuple[object, dict]] = []

    def __init__(self, args, **kwargs):
        _RecordingPopen.calls.append((args, kwargs))
        self.pid = FAKE_PID

    def poll(self):
        return 0

    def wait(self, timeout=None):
        return 0


def test_typed_paths_reach_popen_as_one_argument_without_a_shell(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.subprocess, "Popen", _RecordingPopen)
    _RecordingPopen.calls.clear()
    run_dir = tmp_path / "a b; touch pwned $(id) `id` | cat"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("name = 'x'\n")
    try:
        runner.resume_run(run_dir)
    finally:
        runner._children.pop(FAKE_PID, None)
    ((args, kwargs),) = _RecordingPopen.calls
    assert args == [sys.executable, "-m", "trainers", "resume", str(run_dir.resolve())]
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)
    assert not kwargs.get("shell") and "executable" not in kwargs
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- the Blocks build
def test_ui_builds_with_one_widget_per_field(tmp_path):
    import gradio as gr

    from app.ui import build_ui

    demo = build_ui(runs_dir=tmp_path / "runs")
    assert isinstance(demo, gr.Blocks)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {s.elem_id for s in form.form_fields()} <= ids
    assert {"start", "stop", "resume", "plot-loss", "plot-d", "plot-lr", "samples", "log-tail"} <= ids
    assert (tmp_path / "runs").is_dir()


# ---------------------------------------------------------------- memory estimate on the Setup page
def test_setup_memory_estimate_follows_the_form_and_the_card(tmp_path, monkeypatch):
    """The Setup page and the Run tab show check's estimate of the form's config and its verdict."""
    from app import ui
    from app.pages import setup

    monkeypatch.setenv("PPSF_DEMO_DIR", str(tmp_path / "demo"))
    monkeypatch.setenv("PPSF_MEMORY_CACHE", str(tmp_path / "memory-cache"))
    ctx = ui.UiContext(
        runs_dir=tmp_path / "runs",
        presets_dir=ui.PRESETS_DIR,
        allow_parallel_runs=False,
        configs_dir=tmp_path / "configs",
    )
    values = setup.preset_values(ctx, "demo")
    roomy, _ = setup.memory_estimate(ctx, 24, tuple(values))
    assert roomy.startswith("**Estimated peak:") and "fits a 24 GB card" in roomy
    tight, beside_start = setup.memory_estimate(ctx, 0.001, tuple(values))
    assert "does NOT fit" in tight and beside_start == tight
    unknown, _ = setup.memory_estimate(ctx, None, tuple(values))
    assert "enter the card's memory" in unknown or "fits" in unknown  # a GPU machine judges its own card
    values[[s.key for s in ctx.specs].index("training.batch_size")] = 0
    invalid, _ = setup.memory_estimate(ctx, 24, tuple(values))
    assert "waits for a valid config" in invalid
