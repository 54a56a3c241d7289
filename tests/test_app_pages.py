"""The page modules' logic without a browser: free run names, which run a page opens on, the plots' updates,
the log's wording, uploaded datasets and caption edits, the form's labels and the Flux target widget."""

from __future__ import annotations

import io
import json
import math
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from run_helpers import ui_context

from app import config_form as form
from app import dataset_files, runner
from app import events_view as view
from app.pages import common, setup
from app.pages.common import UiContext
from app.run_view import default_run, exportable_run, in_ui_words
from trainers.config import validate_config
from trainers.events import EVENTS_FILE

REPO = Path(__file__).resolve().parent.parent
DEMO_PRESET = REPO / "presets" / "demo.toml"
FLUX_DEMO_PRESET = REPO / "presets" / "demo-flux.toml"


def _run(runs_dir: Path, name: str, events: list[dict], checkpoint: bool = False, age: float = 0) -> Path:
    """A run folder with these events (and a checkpoint folder), last active `age` seconds ago."""
    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    (run_dir / EVENTS_FILE).write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    if checkpoint:
        (run_dir / "checkpoints" / "step-000002").mkdir(parents=True)
    when = 1_700_000_000 - age
    for path in [run_dir, *run_dir.rglob("*")]:
        os.utime(path, (when, when))
    return run_dir


STARTED = {"type": "start", "step": 0, "total_steps": 10}
CRASHED = [STARTED, {"type": "error", "step": 0, "message": "dataset.path: no such folder"}]
STOPPED = [STARTED, {"type": "step", "step": 2, "loss": 0.5}, {"type": "stopped", "step": 2}]


def _ctx(tmp_path: Path) -> UiContext:
    return ui_context(tmp_path, datasets_dir=tmp_path / "datasets")


# ---------------------------------------------------------------- free names
def test_a_taken_name_gets_the_next_free_one(tmp_path):
    runs = tmp_path / "runs"
    assert runner.free_run_name(runs, "demo") == "demo"
    _run(runs, "demo", STOPPED)
    assert runner.free_run_name(runs, "demo") == "demo-2"
    _run(runs, "demo-2", CRASHED)
    assert runner.free_run_name(runs, "demo") == "demo-3"
    assert runner.free_run_name(runs, "demo-2") == "demo-3"  # not demo-2-2
    (runs / "empty").mkdir()  # a folder without a run (its trainer never started) is free
    assert runner.free_run_name(runs, "empty") == "empty"


def test_loading_a_preset_whose_run_exists_proposes_a_free_name(tmp_path):
    ctx = _ctx(tmp_path)
    _run(ctx.runs_dir, "demo", STOPPED)
    updates = setup._load_preset(ctx, "demo")
    keys = [s.key for s in ctx.specs]
    assert updates[keys.index("name")] == "demo-2"
    message = updates[len(keys)]
    assert "`demo` already holds a run" in message and "demo-2" in message


def test_a_renamed_config_keeps_everything_else(tmp_path):
    data = json.loads(json.dumps(_demo_data(tmp_path / "runs")))
    config = validate_config(data)
    _run(tmp_path / "runs", "demo", STOPPED)
    renamed, note = runner.with_free_name(config)
    assert renamed.name == "demo-2" and renamed.run_dir == tmp_path / "runs" / "demo-2"
    assert renamed.model_dump(exclude={"name"}) == config.model_dump(exclude={"name"})
    assert "demo-2" in note
    assert runner.with_free_name(renamed) == (renamed, "")


def _demo_data(runs_dir: Path) -> dict:
    data, problems = form.read_toml(DEMO_PRESET)
    assert not problems
    return {**data, "output_dir": str(runs_dir)}


# ---------------------------------------------------------------- which run a page opens on
@pytest.fixture
def step_folders_are_checkpoints(monkeypatch):
    """Count every checkpoints/step-N folder as intact (writing a real checkpoint needs a trained model)."""
    from app import run_view
    from trainers.checkpoint import step_folders

    monkeypatch.setattr(run_view, "list_checkpoints", step_folders)


def test_pages_never_open_on_a_run_that_failed_before_its_first_checkpoint(
    tmp_path, step_folders_are_checkpoints
):
    runs = tmp_path / "runs"
    older = _run(runs, "older", STOPPED, checkpoint=True, age=100)
    _run(runs, "typo", CRASHED, age=10)  # newest, crashed at once
    assert default_run(runs) == older
    assert exportable_run(runs) == older
    (runs / "typo" / "checkpoints" / "step-000001").mkdir(parents=True)  # had it saved one, it would count
    os.utime(runs / "typo", (1_700_000_000, 1_700_000_000))
    assert default_run(runs).name == "typo"


def test_no_default_when_every_run_crashed(tmp_path, step_folders_are_checkpoints):
    runs = tmp_path / "runs"
    _run(runs, "typo", CRASHED)
    assert default_run(runs) is None and exportable_run(runs) is None


# ---------------------------------------------------------------- plots
def _steps(lrs: dict[str, float], count: int = 3) -> list[dict]:
    events = [STARTED]
    for step in range(1, count + 1):
        d = 1e-6 * 10**step
        groups = [{"name": name, "d": d, "lr": d * lr} for name, lr in lrs.items()]
        events.append({"type": "step", "step": step, "loss": 1.0 / step, "groups": groups})
    return events


def _updates(events: list[dict]):
    history = view.RunHistory.from_events(events)
    frames = common.plot_frames([history.loss_frame(), history.d_frame(), history.lr_frame()])
    return frames, common.plot_updates(frames)


def test_with_lr_1_everywhere_d_stands_alone_on_a_log_axis():
    frames, (loss, d, lr) = _updates(_steps({"unet": 1.0, "text_encoder": 1.0}))
    assert d.constructor_args["title"] == common.ONE_PLOT_TITLE
    assert lr.constructor_args["visible"] is False
    d_frame = d.constructor_args["value"]
    # the plotted column is log10 d, written out: 1e-5, 1e-4, 1e-3
    unet = d_frame[d_frame.series == "unet"]
    assert list(unet[common.LOG_D]) == pytest.approx([-5.0, -4.0, -3.0])
    assert list(unet["d"]) == pytest.approx([1e-5, 1e-4, 1e-3])


def test_with_lr_differing_per_group_both_plots_show():
    _, (loss, d, lr) = _updates(_steps({"unet": 1.0, "text_encoder": 0.5}))
    assert lr.constructor_args["visible"] is True
    assert d.constructor_args["title"] == common.PLOT_TITLES[1]
    lr_frame = lr.constructor_args["value"]
    text = lr_frame[lr_frame.series == "text_encoder"]
    assert list(text[common.LOG_LR]) == pytest.approx(
        [math.log10(0.5e-5), math.log10(0.5e-4), math.log10(0.5e-3)]
    )


def test_x_axis_spans_whole_steps_early_and_is_left_free_later():
    _, plots = _updates(_steps({"unet": 1.0}, count=3))
    assert all(plot.constructor_args["x_lim"] == [0, common.MIN_X_SPAN] for plot in plots)
    _, plots = _updates(_steps({"unet": 1.0}, count=10))  # 1..10 on a free axis has ticks 0.5 apart
    assert all(plot.constructor_args["x_lim"] == [0, 4 * common.MIN_X_SPAN] for plot in plots)
    _, plots = _updates(_steps({"unet": 1.0}, count=45))
    assert all(plot.constructor_args["x_lim"] is None for plot in plots)  # the data spans enough steps


def test_the_freeze_rule_is_drawn_on_the_log_axis():
    events = _steps({"unet": 1.0}, count=4)
    events.insert(3, {"type": "freeze", "step": 2, "since_step": 2})
    _, (_, d, _) = _updates(events)
    frame = d.constructor_args["value"]
    rule = frame[frame.series == "d frozen at step 2"]
    assert list(rule.step) == [2, 2]
    assert list(rule[common.LOG_D]) == pytest.approx([-5.0, -2.0])


def test_values_without_a_logarithm_are_left_out():
    events = _steps({"unet": 1.0, "frozen": 0.0})
    frames, (_, _, lr) = _updates(events)
    frame = lr.constructor_args["value"]
    assert set(frame.series) == {"unet"} and np.isfinite(frame[common.LOG_LR]).all()
    assert lr.constructor_args["visible"] is True  # lr = 0 in one group: d·lr is not d


def test_an_ended_run_shows_no_speed_or_eta():
    events = [STARTED] + [
        {"type": "step", "step": s, "loss": 1.0, "time": 100.0 + s, "step_seconds": 1.0} for s in range(1, 5)
    ]
    progress = view.progress(events)
    assert "ETA" in view.progress_html(progress) and "s/step" in view.progress_html(progress)
    ended = view.progress_html(progress, live=False)
    assert "ETA" not in ended and "s/step" not in ended and "step 4/10" in ended
    assert progress.text(live=False) == "step 4/10 (40%)"  # as the Runs page says it


def test_the_log_tail_names_the_ui_buttons_not_ctrl_c():
    log = "step 5\nstopping after this step (saving a checkpoint); press Ctrl-C again to abort\n"
    shown = in_ui_words(log)
    assert "Ctrl-C" not in shown and "Kill now aborts without saving" in shown
    assert "Ctrl-C" not in in_ui_words("stopped: aborted by a second Ctrl-C")


# ---------------------------------------------------------------- form labels and the Flux target widget
def test_labels_are_words_and_the_hint_names_the_config_key():
    specs = {s.key: s for s in form.form_fields()}
    assert specs["training.max_steps"].label == "Training steps"
    assert specs["training.batch_size"].label == "Batch size"
    assert specs["dataset.path"].label == "Dataset folder"
    assert all("_" not in s.label or "(" in s.label for s in specs.values()), [
        s.label for s in specs.values() if "_" in s.label and "(" not in s.label
    ]
    assert all(s.hint.endswith(f"Config key: {s.key}") for s in specs.values())


def test_flux_lora_targets_take_a_named_set_or_typed_module_names():
    specs = form.form_fields()
    spec = next(s for s in specs if s.key == "flux.lora_targets")
    assert spec.kind == "set_or_list" and spec.choices == ("attention", "attention+mlp", "all")
    data, problems = form.read_toml(FLUX_DEMO_PRESET)
    assert not problems
    values = form.values_from_config(data, specs)
    index = [s.key for s in specs].index("flux.lora_targets")
    for typed, expected in [
        ("all", "all"),
        ("to_q, to_k\nproj_out", ["to_q", "to_k", "proj_out"]),
        ("to_q", ["to_q"]),
    ]:
        values[index] = typed
        config, problems = form.validate_values(values, specs)
        assert problems == [], problems
        assert config.flux.lora_targets == expected
        assert form.values_from_config(config, specs)[index] == (
            typed if isinstance(expected, str) else ", ".join(expected)
        )


def test_a_kept_form_restores_a_typed_target_list():
    specs = form.form_fields()
    assert form.restorable_values({"flux.lora_targets": "to_q, to_k"}, specs) == {
        "flux.lora_targets": "to_q, to_k"
    }


# ---------------------------------------------------------------- datasets from uploads
def _png(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    Image.new("RGB", (64, 64), colour).save(path)
    return path


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploaded_images_and_captions_make_a_new_dataset(tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    files = [_png(uploads / "a.png"), _png(uploads / "b.png"), uploads / "a.txt", uploads / "notes.pdf"]
    files[2].write_text("a red square", encoding="utf-8")
    files[3].write_bytes(b"%PDF")
    made = dataset_files.create_dataset(tmp_path / "datasets", "squares", files)
    assert made.folder == (tmp_path / "datasets" / "squares").resolve()
    assert sorted(p.name for p in made.folder.iterdir()) == ["a.png", "a.txt", "b.png"]
    assert (made.images, made.captions, made.ignored) == (2, 1, ["notes.pdf"])
    assert (made.folder / "a.png").read_bytes() == files[0].read_bytes()
    with pytest.raises(dataset_files.DatasetFileError, match="already exists"):
        dataset_files.create_dataset(tmp_path / "datasets", "squares", files)


@pytest.mark.parametrize("name", ["", "../up", "a/b", "..", ".hidden", "x" * 65])
def test_a_dataset_name_must_be_a_plain_folder_name(tmp_path, name):
    with pytest.raises(dataset_files.DatasetFileError, match="dataset name"):
        dataset_files.create_dataset(tmp_path / "datasets", name, [_png(tmp_path / "a.png")])
    assert not (tmp_path / "up").exists()


def test_a_zip_is_unpacked_with_its_subfolders(tmp_path):
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("10_cat/one.png", _png_bytes())
        zipped.writestr("10_cat/one.txt", "a cat")
        zipped.writestr("__MACOSX/10_cat/._one.png", b"junk")
        zipped.writestr("readme.md", "hello")
    made = dataset_files.create_dataset(tmp_path / "datasets", "cats", [archive])
    assert sorted(str(p.relative_to(made.folder)) for p in made.folder.rglob("*") if p.is_file()) == [
        "10_cat/one.png",
        "10_cat/one.txt",
    ]
    assert (made.images, made.captions) == (1, 1)


@pytest.mark.parametrize("member", ["../evil.png", "/abs/evil.png", "a/../../evil.png", "C:/evil.png"])
def test_a_zip_reaching_outside_the_folder_is_refused_and_leaves_nothing(tmp_path, member):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("good.png", _png_bytes())
        zipped.writestr(member, _png_bytes())
    datasets = tmp_path / "datasets"
    with pytest.raises(dataset_files.DatasetFileError, match="outside the dataset folder"):
        dataset_files.create_dataset(datasets, "bad", [archive])
    assert list(datasets.iterdir()) == []  # no folder, no staging left behind
    assert not (tmp_path / "evil.png").exists()


def test_a_zip_holding_a_symlink_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        info = zipfile.ZipInfo("link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zipped.writestr(info, "/etc/passwd")
    with pytest.raises(dataset_files.DatasetFileError, match="symbolic link"):
        dataset_files.create_dataset(tmp_path / "datasets", "links", [archive])


def test_an_oversize_archive_is_refused_whatever_it_declares(tmp_path, monkeypatch):
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("a.png", _png_bytes())
        zipped.writestr("huge.txt", "0" * 500_000)  # compresses to almost nothing
    monkeypatch.setattr(dataset_files, "MAX_DATASET_BYTES", 100_000)
    with pytest.raises(dataset_files.DatasetFileError, match="more than"):
        dataset_files.create_dataset(tmp_path / "datasets", "big", [archive])
    assert list((tmp_path / "datasets").iterdir()) == []
    # an archive that understates its sizes is stopped by the bytes actually read
    monkeypatch.setattr(zipfile.ZipInfo, "file_size", 1, raising=False)
    budget = dataset_files._Budget()
    with pytest.raises(dataset_files.DatasetFileError, match="more than"):
        dataset_files._copy_limited(io.BytesIO(b"0" * 200_000), tmp_path / "out.txt", budget)


def test_a_caption_is_rewritten_in_place_only_for_a_listed_image(tmp_path):
    image = _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("old caption\n", encoding="utf-8")
    assert dataset_files.read_caption(image, ".txt") == "old caption"
    path = dataset_files.write_caption(image, [image], ".txt", "  a new caption ")
    assert path == tmp_path / "a.txt" and path.read_text(encoding="utf-8") == "a new caption\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    other = _png(tmp_path / "b.png")
    with pytest.raises(dataset_files.DatasetFileError, match="choose an image"):
        dataset_files.write_caption(other, [image], ".txt", "x")
    with pytest.raises(dataset_files.DatasetFileError, match="caption_extension"):
        dataset_files.write_caption(image, [image], "/../x", "x")
    assert not (tmp_path / "b.txt").exists()


def test_start_with_a_taken_name_starts_under_a_free_one(tmp_path, monkeypatch):
    from app.pages import run

    monkeypatch.setenv("PPSF_DEMO_DIR", str(tmp_path / "demo"))
    ctx = _ctx(tmp_path)
    _run(ctx.runs_dir, "demo", STOPPED)
    started = []

    def start_run(config, allow_parallel=False, gpus=1):
        started.append(config)
        return config.run_dir

    monkeypatch.setattr(runner, "start_run", start_run)
    values = setup.preset_values(ctx, "demo")
    assert values[[s.key for s in ctx.specs].index("name")] == "demo"
    text, run_dir, name, *_ = run._start(ctx, tuple(values))
    assert [config.name for config in started] == ["demo-2"]
    assert name == "demo-2" and run_dir == str(ctx.runs_dir / "demo-2")
    assert "Started **demo-2**" in text and "`demo` already holds a run" in text


def test_the_memory_estimate_puts_peak_and_verdict_before_its_table():
    summary = "\n".join(
        [
            "**Estimated peak: 1.0 GiB** (phase: training)",
            "",
            "| part | memory |",
            "|---|---|",
            "| LoRA weights | 0.1 GiB |",
            "",
            "Fits a 24 GB card.",
            "_Estimated on the meta device._",
        ]
    )
    text = setup.compact_estimate(summary)
    assert text.startswith("**Estimated peak: 1.0 GiB**")
    assert text.index("Fits a 24 GB card.") < text.index("<details>") < text.index("| LoRA weights |")
    assert (
        setup.compact_estimate("**Memory estimate unavailable:** x") == "**Memory estimate unavailable:** x"
    )


def test_launch_prints_its_own_flags_not_gradios_share_hint(tmp_path, monkeypatch, capsys):
    from browser_helpers import free_port

    from launch import LaunchSettings, launch

    monkeypatch.setenv("PPSF_DEMO_DIR", str(tmp_path / "demo"))
    port = free_port()
    demo = launch(LaunchSettings(port=port, runs_dir=tmp_path / "runs"), block=False)
    demo.close()
    out = capsys.readouterr().out
    assert "share=True" not in out
    assert f"http://127.0.0.1:{port}" in out and "--share --auth" in out


def test_a_refused_start_leaves_the_name_as_typed(tmp_path, monkeypatch):
    """Renaming on a refusal would count as a form edit, and an edit clears the refusal from the page."""
    import gradio as gr

    from app.pages import run

    monkeypatch.setenv("PPSF_DEMO_DIR", str(tmp_path / "demo"))
    ctx = _ctx(tmp_path)
    _run(ctx.runs_dir, "demo", STOPPED)
    keys = [s.key for s in ctx.specs]
    values = setup.preset_values(ctx, "demo")
    values[keys.index("dataset.path")] = str(tmp_path / "no-such-folder")
    text, run_dir, name, *_ = run._start(ctx, tuple(values))
    assert text.startswith(run.NOT_STARTED) and "dataset.path" in text
    assert isinstance(run_dir, type(gr.skip())) and isinstance(name, type(gr.skip()))


def test_the_bucket_chart_counts_from_zero(tmp_path):
    """Gradio's plots start the y axis at the data's lowest value: a dataset whose buckets all hold 12
    images drew a zero-height bar on an axis from 12 to 12 (the browser test measures the bar)."""
    from app.ui import build_ui

    demo = build_ui(runs_dir=tmp_path / "runs")
    chart = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "bucket-plot")
    assert chart.y_lim == [0, None]


# ---------------------------------------------------------------- several GPUs
def test_a_run_on_several_gpus_starts_the_trainer_with_gpus(tmp_path, monkeypatch):
    """With two or more GPUs here, Start and Resume pass Setup's GPU count on as `--gpus N` (issue 12)."""
    from app.pages import run

    assert runner.trainer_command("train", Path("c.toml"))[-1] == "c.toml"
    assert runner.trainer_command("resume", Path("r"), 3)[-2:] == ["--gpus", "3"]
    spawned = []
    monkeypatch.setattr(runner, "_spawn", lambda command, run_dir: spawned.append(command) or 1)
    monkeypatch.setenv("PPSF_DEMO_DIR", str(tmp_path / "demo"))
    ctx = UiContext(**{**_ctx(tmp_path).__dict__, "gpus_present": 4})
    values = setup.preset_values(ctx, "demo")
    text, run_dir, *_ = run._start(ctx, tuple(values), 2)
    assert "Started" in text and spawned[-1][-2:] == ["--gpus", "2"]
    run._start(ctx, tuple(values), 9)  # more than are here: all of them
    assert spawned[-1][-2:] == ["--gpus", "4"]
    one_gpu = _ctx(tmp_path)  # fewer than two GPUs: the field is hidden and a run is one process
    run._start(one_gpu, tuple(values), 2)
    assert "--gpus" not in spawned[-1]


def test_the_gpu_count_is_offered_only_where_there_are_several(tmp_path, monkeypatch):
    from app import ui

    for present, visible in ((0, False), (1, False), (2, True)):
        monkeypatch.setattr(runner, "gpu_count", lambda present=present: present)
        demo = ui.build_ui(tmp_path / f"runs-{present}", REPO / "presets")
        (gpus,) = [block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "gpus"]
        assert gpus.visible is visible
