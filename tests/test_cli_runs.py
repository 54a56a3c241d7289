"""No traps for a new user (issue 10, items 3 and 4, CLI side): a run folder without checkpoint never blocks
a new `train` of its name, `resume` of a finished run touches nothing, a run that failed before its first
checkpoint takes a fixed config, missing runs and checkpoints are listed with what exists, and the CLI's
last lines name the LoRA files and how to use them. Runs use the tiny SDXL model for two steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w

from trainers import train as training
from trainers.__main__ import main as cli
from trainers.config import ConfigError
from trainers.events import read_events
from trainers.tiny_models import CLIP_CONFIG, UNET_CONFIG, write_demo_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def weightless_model(tmp_path_factory) -> Path:
    """A diffusers folder with the tiny model's configs and no weights: every check passes, loading fails
    (a run that fails after it started, before its first checkpoint)."""
    folder = tmp_path_factory.mktemp("weightless") / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    for component, config in (
        ("unet", {"_class_name": "UNet2DConditionModel", **UNET_CONFIG}),
        ("text_encoder", {"architectures": ["CLIPTextModel"], **CLIP_CONFIG}),
        ("text_encoder_2", {"architectures": ["CLIPTextModelWithProjection"], **CLIP_CONFIG}),
    ):
        (folder / component).mkdir()
        (folder / component / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("data") / "data", num_images=4)


def _config_file(tmp_path: Path, model: Path, dataset: Path, name: str = "run", file: str = "c.toml") -> Path:
    data = {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(model)},
        "dataset": {"path": str(dataset), "resolution": 64},
        "lora": {"rank": 4},
        "training": {"max_steps": 2, "batch_size": 2, "precision": "fp32"},
        "sampling": {"prompts": ["shapes, a red circle"], "steps": 2},
        "saving": {"every_n_steps": 2, "dtype": "fp32"},
    }
    path = tmp_path / file
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def _failed_attempt(tmp_path: Path, weightless_model: Path, dataset: Path, capsys) -> Path:
    """`train` that fails after it started (loading the model), before any checkpoint."""
    assert cli(["train", str(_config_file(tmp_path, weightless_model, dataset, file="bad.toml"))]) == 1
    run_dir = tmp_path / "runs" / "run"
    err = capsys.readouterr().err.splitlines()
    assert "Traceback (most recent call last):" in err and err[-2].startswith(
        "error: RuntimeError: model.path"
    )
    assert err[-1] == (
        f"{run_dir}: no checkpoint was saved, so nothing is lost: fix the config, then run `train` again (the "
        f"same name starts over) or `python -m trainers resume {run_dir} --config FILE`"
    )
    assert read_events(run_dir)[-1]["type"] == "error"
    assert not (run_dir / "checkpoints").exists()
    return run_dir


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- a failed start never blocks the name
def test_train_again_after_a_failed_start_starts_over_and_keeps_the_old_files(
    tmp_path, tiny_model, weightless_model, dataset, capsys
) -> None:
    run_dir = _failed_attempt(tmp_path, weightless_model, dataset, capsys)
    (run_dir / "train.log").write_text("the UI's log of this folder\n")  # files the UI keeps there stay
    old = _tree(run_dir)
    capsys.readouterr()

    assert cli(["train", str(_config_file(tmp_path, tiny_model, dataset))]) == 0

    err = capsys.readouterr().err
    attempts = sorted(run_dir.glob("attempt-*"))
    assert len(attempts) == 1
    assert f"{run_dir} held an attempt that never reached a checkpoint" in err and str(attempts[0]) in err
    assert "starting over" in err and len([line for line in err.splitlines() if "starting over" in line]) == 1
    moved = _tree(attempts[0])
    for name, content in old.items():  # nothing lost: each old file is either moved aside or left as it was
        assert moved.get(name) == content or (run_dir / name).read_bytes() == content
    assert (run_dir / "train.log").read_text() == "the UI's log of this folder\n"
    events = read_events(run_dir)
    assert events[-1]["type"] == "done" and not any(e["type"] == "error" for e in events)


def test_a_wrong_path_leaves_no_run_folder_behind(tmp_path, tiny_model) -> None:
    config = _config_file(tmp_path, tiny_model, tmp_path / "no-images")
    assert cli(["train", str(config)]) == 2
    assert not (tmp_path / "runs" / "run").exists()


def test_resume_of_a_failed_start_takes_the_fixed_config(
    tmp_path, tiny_model, weightless_model, dataset, capsys
) -> None:
    run_dir = _failed_attempt(tmp_path, weightless_model, dataset, capsys)
    fixed = _config_file(tmp_path, tiny_model, dataset, name="other-name", file="fixed.toml")

    assert cli(["resume", str(run_dir), "--config", str(fixed)]) == 0

    assert read_events(run_dir)[-1]["type"] == "done"
    saved = (run_dir / "config.toml").read_text()
    assert str(tiny_model) in saved and 'name = "run"' in saved  # the folder's name, whatever the file says
    assert "finished" in capsys.readouterr().out


def test_resume_without_config_of_a_broken_start_says_how_to_fix_it(tmp_path, tiny_model, dataset) -> None:
    config = _config_file(tmp_path, tiny_model, dataset)
    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(
        config.read_text().replace(str(dataset), str(tmp_path / "moved-away")), encoding="utf-8"
    )
    with pytest.raises(ConfigError) as caught:
        training.resume(run_dir)
    assert caught.value.problems[0] == f"dataset.path: {tmp_path / 'moved-away'} does not exist"
    assert f"python -m trainers resume {run_dir} --config FILE" in caught.value.problems[-1]


# ---------------------------------------------------------------- finished runs, missing runs and checkpoints
@pytest.fixture
def finished_run(tmp_path, tiny_model, dataset, capsys) -> Path:
    assert cli(["train", str(_config_file(tmp_path, tiny_model, dataset))]) == 0
    return tmp_path / "runs" / "run"


def test_train_ends_naming_the_files_and_how_to_use_them(finished_run, capsys) -> None:
    out = capsys.readouterr().out.splitlines()
    lora = finished_run / "lora"
    kohya, diffusers = lora / "run-step000002.safetensors", lora / "run-step000002-diffusers.safetensors"
    assert kohya.is_file() and diffusers.is_file()
    tail = "\n".join(out[-7:])
    assert f"{kohya}  (kohya format)" in tail and f"{diffusers}  (diffusers format)" in tail
    assert "ComfyUI/models/loras" in tail and "A1111/Forge" in tail
    assert f'pipe.load_lora_weights("{lora}", weight_name="{diffusers.name}")' in tail
    assert out[-1].startswith("open it in the UI: python launch.py")


def test_resume_of_a_finished_run_says_so_and_touches_nothing(finished_run, capsys) -> None:
    capsys.readouterr()
    before = _tree(finished_run)
    assert cli(["resume", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert f"{finished_run} is finished (step 2); nothing to resume" in out
    assert "run-step000002.safetensors  (kohya format)" in out
    assert _tree(finished_run) == before  # no reload, no new samples, no re-export, no new event


def test_train_into_a_finished_run_is_refused_naming_its_files(finished_run, tmp_path, capsys) -> None:
    capsys.readouterr()
    assert cli(["train", str(tmp_path / "c.toml")]) == 2
    err = capsys.readouterr().err
    assert "already holds a run, finished (step 2; run-step000002.safetensors" in err and "--set name=" in err


def test_resume_with_a_config_keeps_a_run_with_checkpoints_on_its_own(finished_run, tmp_path) -> None:
    (finished_run / "events.jsonl").write_text("")  # not finished any more: a run with checkpoints
    with pytest.raises(ConfigError, match="has checkpoints \\(step 2\\), so it continues with its own"):
        training.resume(finished_run, tmp_path / "c.toml")


def test_resume_of_a_missing_run_lists_the_runs_that_exist(finished_run, tmp_path, capsys) -> None:
    capsys.readouterr()
    assert cli(["resume", str(tmp_path / "runs" / "nope")]) == 2
    err = capsys.readouterr().err
    assert f"no such run: {tmp_path / 'runs' / 'nope'}" in err
    assert f"runs in {tmp_path / 'runs'}: {finished_run}" in err
    assert "config file not found" not in err


def test_export_of_a_pruned_checkpoint_lists_the_checkpoints_there(finished_run, capsys) -> None:
    capsys.readouterr()
    assert cli(["export", str(finished_run), "--checkpoint", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint 1: {finished_run} has no checkpoint at step 1; checkpoints there: 2" in err


def test_export_names_the_files_and_their_use(finished_run, capsys) -> None:
    capsys.readouterr()
    assert cli(["export", str(finished_run), "--format", "diffusers"]) == 0
    out = capsys.readouterr().out
    assert "run-step000002-diffusers.safetensors  (diffusers format)" in out and "load_lora_weights" in out


def test_check_says_what_train_would_do_with_a_taken_name(finished_run, tmp_path, capsys) -> None:
    capsys.readouterr()
    assert cli(["check", str(tmp_path / "c.toml")]) == 0
    out = capsys.readouterr().out
    assert f"note: {finished_run} already holds a finished run (step 2): `train` refuses this name" in out


def test_resume_refuses_set_without_config(finished_run, capsys) -> None:
    capsys.readouterr()
    assert cli(["resume", str(finished_run), "--set", "training.max_steps=9"]) == 2
    assert "--set goes with --config" in capsys.readouterr().err


def test_resume_of_a_bare_name_lists_the_runs_folder(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "config.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    assert cli(["resume", "demo"]) == 2
    assert "no such run: demo (not a folder); runs in runs: runs/demo." in capsys.readouterr().err


def test_a_second_trainer_in_a_busy_folder_is_refused_and_moves_nothing(
    tmp_path, tiny_model, dataset, capsys
) -> None:
    from trainers.run_folder import trainer_lock

    run_dir = tmp_path / "runs" / "run"
    config = _config_file(tmp_path, tiny_model, dataset)
    with trainer_lock(run_dir):  # what a running trainer holds (the system drops it when that process ends)
        (run_dir / "events.jsonl").write_text('{"type": "start", "step": 0}\n')
        (run_dir / "config.toml").write_text(config.read_text())
        before = _tree(run_dir)
        assert cli(["train", str(config)]) == 2
        assert cli(["resume", str(run_dir)]) == 2
        assert _tree(run_dir) == before and not list(run_dir.glob("attempt-*"))
    err = capsys.readouterr().err
    assert err.count(f"error: a trainer is running in {run_dir} now") == 2
