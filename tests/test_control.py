"""Live controls: each request acknowledged and its effect checked, freeze across resume, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
from run_helpers import config_builder

from trainers import train as training
from trainers.__main__ import main as cli
from trainers.checkpoint import list_checkpoints
from trainers.config import validate_config
from trainers.control import CONTROL_DIR, ControlError, request_control, trainer_running
from trainers.events import read_events

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATASET_IMAGES = 4  # the conftest's `dataset`

make_config = config_builder(sampling={"prompts": ["shapes, a red circle"]})


def run_with_requests(
    tmp_path, model_path, dataset_path, requests: dict[int, list[str]], monkeypatch, **sections
):
    """Train, sending `requests[step]` through request_control right after that step is logged."""
    original = training.Trainer._log_step

    def log_and_request(self, optimizer, state, *args):
        original(self, optimizer, state, *args)
        for action in requests.get(state.step, []):
            request_control(self.run_dir, action)

    monkeypatch.setattr(training.Trainer, "_log_step", log_and_request)
    try:
        return training.train(validate_config(make_config(tmp_path, model_path, dataset_path, **sections)))
    finally:
        monkeypatch.undo()


def of(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_events(run_dir) if e["type"] == kind]


def test_sample_checkpoint_and_a_second_freeze_are_acknowledged(
    tmp_path, tiny_model, dataset, monkeypatch
) -> None:
    run_dir = run_with_requests(
        tmp_path,
        tiny_model,
        dataset,
        {3: ["sample", "checkpoint"], 5: ["freeze"], 7: ["freeze"]},
        monkeypatch,
    )
    acks = [(e["step"], e["action"], e["status"]) for e in of(run_dir, "control")]
    assert acks == [
        (3, "sample", "done"),
        (3, "checkpoint", "done"),
        (5, "freeze", "done"),
        (7, "freeze", "refused"),
    ]
    assert "already frozen (since step 6)" in of(run_dir, "control")[-1]["message"]
    assert (run_dir / "samples" / "step-000003-00.png").is_file()
    assert 3 in [step for step, _ in list_checkpoints(run_dir)]
    assert not list((run_dir / CONTROL_DIR).glob("*.json")), "each request is removed once acknowledged"


def test_freeze_holds_d_and_survives_resume(tmp_path, tiny_model, dataset, monkeypatch) -> None:
    run_dir = run_with_requests(tmp_path, tiny_model, dataset, {4: ["freeze"], 8: ["stop"]}, monkeypatch)
    assert [(e["action"], e["status"]) for e in of(run_dir, "control")] == [
        ("freeze", "done"),
        ("stop", "done"),
    ]
    assert of(run_dir, "stopped")[-1]["step"] == 8
    (freeze,) = of(run_dir, "freeze")
    assert (freeze["rule"], freeze["step"], freeze["since_step"]) == ("manual", 4, 5)
    state = json.loads((list_checkpoints(run_dir)[-1][1] / "trainer_state.json").read_text())
    assert state["param_groups"][0]["prodigy_steps"] == 5 and state["trainer"]["d_frozen_logged"]

    training.resume(run_dir)
    ds = [e["groups"][0]["d"] for e in of(run_dir, "step")]
    assert len(ds) == 12 and ds[3] > 1e-4
    assert len(set(ds[3:])) == 1, "d after the freeze step stays where it was, through the resume"
    assert len(of(run_dir, "freeze")) == 1


def test_stale_request_is_refused_not_acted_on(tmp_path, tiny_model, dataset) -> None:
    config = validate_config(make_config(tmp_path, tiny_model, dataset, training={"max_steps": 2}))
    folder = config.run_dir / CONTROL_DIR
    folder.mkdir(parents=True)
    (folder / "00000000000000000001-stop.json").write_text(
        json.dumps({"action": "stop", "requested_at": 1.0})
    )
    run_dir = training.train(config)
    (ack,) = of(run_dir, "control")
    assert (ack["action"], ack["status"]) == ("stop", "refused") and "before this trainer started" in ack[
        "message"
    ]
    assert of(run_dir, "done"), "the stale stop did not stop the run"


def test_a_request_the_run_ends_before_is_refused(tmp_path, tiny_model, dataset, monkeypatch) -> None:
    original = training.export_checkpoint

    def export_and_request(run_dir, *args, **kwargs):  # after the last step's controls were read
        request_control(run_dir, "checkpoint")
        return original(run_dir, *args, **kwargs)

    monkeypatch.setattr(training, "export_checkpoint", export_and_request)
    run_dir = training.train(
        validate_config(make_config(tmp_path, tiny_model, dataset, training={"max_steps": 2}))
    )
    (ack,) = of(run_dir, "control")
    assert (ack["action"], ack["status"], ack["message"]) == (
        "checkpoint",
        "refused",
        "the run ended before acting on it",
    )
    assert not trainer_running(run_dir)


def test_a_run_that_is_not_running_refuses(tmp_path, capsys) -> None:
    run_dir = tmp_path / "runs" / "idle"
    run_dir.mkdir(parents=True)
    assert not trainer_running(run_dir)
    with pytest.raises(ControlError, match="idle is not running"):
        request_control(run_dir, "freeze")
    assert cli(["control", str(run_dir), "checkpoint"]) == 1
    assert "is not running, so it cannot checkpoint" in capsys.readouterr().err
    with pytest.raises(ControlError, match="unknown control action"):
        request_control(run_dir, "explode")
    assert not (run_dir / CONTROL_DIR).exists()


def test_cli_stops_a_trainer_in_another_process(tmp_path, tiny_model, dataset, capsys) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        tomli_w.dumps(
            make_config(
                tmp_path, tiny_model, dataset, training={"max_steps": 100_000}, sampling={"prompts": []}
            )
        )
    )
    run_dir = tmp_path / "runs" / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "trainers", "train", str(config)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not of(run_dir, "step"):
            assert process.poll() is None and time.monotonic() < deadline, (
                "the trainer did not start stepping"
            )
            time.sleep(0.2)
        assert cli(["control", str(run_dir), "stop"]) == 0
        assert "stop requested" in capsys.readouterr().out
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    (ack,) = of(run_dir, "control")
    assert (ack["action"], ack["status"]) == ("stop", "done")
    assert (
        of(run_dir, "stopped")[-1]["step"] == ack["step"] and list_checkpoints(run_dir)[-1][0] == ack["step"]
    )
    assert cli(["control", str(run_dir), "stop"]) == 1, "once the trainer has exited the run is not running"
