"""Nothing lost: kills at the worst moments, damaged files, a full disk, early stops, tampered checkpoints.

The fault-injection cases SIGKILL a real `python -m trainers` process inside a write's critical window
(PPSF_FAULT, see trainers.atomic.fault_point), resume, and compare the result bitwise with a run that was
never interrupted. A fast subset runs by default; `python -m pytest -m slow` runs every point.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from safetensors.torch import load_file, save_file

from trainers import stop
from trainers import train as training
from trainers.__main__ import main as cli
from trainers.atomic import stale_temporaries, temporary_sibling
from trainers.checkpoint import list_checkpoints, recover_run_folder
from trainers.config import load_config
from trainers.events import EventLog, read_events
from trainers.export_run import export_checkpoint

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT = 240


@pytest.fixture(scope="module", autouse=True)
def demo_env(tmp_path_factory):
    """One demo model and dataset for this module, shared with the trainer subprocesses; one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PPSF_DEMO_DIR", str(tmp_path_factory.mktemp("demo")))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.delenv("PPSF_FAULT", raising=False)
        yield
    torch.set_num_threads(previous)


def write_config(folder: Path, **sections) -> Path:
    """A 6-step run of the demo model, saving every 2 steps and keeping 1 checkpoint."""
    data = {
        "name": "r",
        "output_dir": str(folder / "runs"),
        "model": {"path": "demo://tiny-sdxl"},
        "dataset": {"path": "demo://shapes", "resolution": 64, "caption_dropout": 0.2},
        "lora": {"rank": 2, "alpha": 2},
        "training": {"max_steps": 6, "batch_size": 1, "precision": "fp32", "seed": 3},
        "sampling": {"prompts": []},
        "saving": {"every_n_steps": 2, "keep_last": 1, "formats": ["kohya"], "dtype": "fp32"},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path


def trainer_process(*args: str, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if fault:
        env["PPSF_FAULT"] = fault
    return subprocess.Popen(
        [sys.executable, "-m", "trainers", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    """(exit code, stderr); the process is killed if it outlives the time limit."""
    try:
        _, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"trainer did not finish in {SUBPROCESS_TIMEOUT} s:\n{err[-3000:]}")
    return process.returncode, err


def killed_at(fault: str, *args: str) -> None:
    code, err = finish(trainer_process(*args, fault=fault))
    assert code == -signal.SIGKILL, f"the fault point {fault} was not reached (exit {code}):\n{err[-3000:]}"


def step_losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if e["type"] == "step"]


def final_lora(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(run_dir)[-1][1] / "lora.safetensors")


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same step history, same final LoRA and export bit for bit, nothing left over from killed writes."""
    assert step_losses(run_dir) == step_losses(reference)
    assert [s for s, _ in list_checkpoints(run_dir)] == [6]
    a, b = final_lora(run_dir), final_lora(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    exported = "lora/r-step000006.safetensors"
    a, b = load_file(run_dir / exported), load_file(reference / exported)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "lora"):
        assert not [p.name for p in folder.iterdir() if ".tmp-" in p.name], folder
    assert read_events(run_dir)[-1]["type"] == "done"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must equal."""
    return training.train(load_config(write_config(tmp_path_factory.mktemp("reference"))))


# ---------------------------------------------------------------- SIGKILL of a real trainer, then resume
def test_kill_while_writing_a_checkpoint_then_while_rewriting_events(tmp_path, reference) -> None:
    config = write_config(tmp_path)
    run_dir = tmp_path / "runs" / "r"
    killed_at("checkpoint-write:2", "train", str(config))  # while step-000004 is being written
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]
    killed_at("rename:events.jsonl:1", "resume", str(run_dir))  # truncate_after's rewrite
    assert len(step_losses(run_dir)) == 4, "the kill during the rewrite must leave the whole history"
    training.resume(run_dir)
    assert_same_run(run_dir, reference)


def _killed_before_done(reference: Path, run_dir: Path) -> Path:
    """A copy of the finished reference killed after its final checkpoint, before its `done` event: resume
    saves the final checkpoint again (a finished run, with its `done` event, is left alone)."""
    shutil.copytree(reference, run_dir)
    events = run_dir / "events.jsonl"
    lines = events.read_text(encoding="utf-8").splitlines(keepends=True)
    assert json.loads(lines[-1])["type"] == "done"
    events.write_text("".join(lines[:-1]), encoding="utf-8")
    return run_dir


def test_kill_while_resaving_a_finished_run_keeps_its_checkpoint(tmp_path, reference) -> None:
    run_dir = _killed_before_done(reference, tmp_path / "r")
    # keep_last = 1: the final step-000006 is the only checkpoint, and resume saves it again
    killed_at("checkpoint-write:1", "resume", str(run_dir))
    training.resume(run_dir)
    resumed = [e for e in read_events(run_dir) if e["type"] == "resumed"]
    assert resumed and resumed[-1]["step"] == 6, "the run must not start over"
    assert_same_run(run_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        "checkpoint-write:1",
        "checkpoint-write:3",
        "checkpoint-prune:1",
        "checkpoint-prune:2",
        "rename:events.jsonl:1",
        "rename:export_metadata.json:1",
        "rename:config.toml:1",
        "rename:r-step000006.safetensors:1",
    ],
)
def test_kill_at_each_point_of_a_run(tmp_path, reference, fault) -> None:
    config = write_config(tmp_path)
    killed_at(fault, "train", str(config))
    run_dir = tmp_path / "runs" / "r"
    if not (run_dir / "config.toml").is_file():  # killed before the run existed: start it again
        training.train(load_config(config))
    else:
        training.resume(run_dir)
    assert_same_run(run_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        "checkpoint-swap:1",
        "rename:export_metadata.json:1",
        "rename:events.jsonl:1",
        "rename:r-step000006.safetensors:1",
    ],
)
def test_kill_at_each_point_of_resuming_a_finished_run(tmp_path, reference, fault) -> None:
    run_dir = _killed_before_done(reference, tmp_path / "r")
    killed_at(fault, "resume", str(run_dir))
    training.resume(run_dir)
    assert [e for e in read_events(run_dir) if e["type"] == "resumed"][-1]["step"] == 6
    assert_same_run(run_dir, reference)


# ---------------------------------------------------------------- leftovers, partial lines, broken checkpoints
def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_leftover_temporaries_of_dead_writers_are_removed(tmp_path) -> None:
    run_dir = tmp_path / "run"
    dead, alive = _dead_pid(), os.getppid()
    for folder in ("", "samples", "lora", "checkpoints"):
        (run_dir / folder).mkdir(parents=True, exist_ok=True)
    stale = [
        run_dir / f".events.jsonl.tmp-{dead}-0123abcd",
        run_dir / "samples" / f".step-000002-00.png.tmp-{dead}-0123abcd",
        run_dir / "lora" / f".r-step000002.safetensors.tmp-{os.getpid()}-0123abcd",  # our own old id
    ]
    for path in stale:
        path.write_text("half")
    (run_dir / "checkpoints" / f".step-000004.tmp-{dead}-0123abcd").mkdir()  # incomplete: no files
    other_writer = run_dir / f".ui-config.toml.tmp-{alive}-0123abcd"
    other_writer.write_text("being written")
    unrelated = [run_dir / ".hidden.tmp", run_dir / f".x.tmp-{dead}-nothex00", run_dir / "notes.txt"]
    for path in unrelated:
        path.write_text("mine")

    recover_run_folder(run_dir)
    left = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*")}
    assert left == {"samples", "lora", "checkpoints", other_writer.name, *(p.name for p in unrelated)}


def test_events_after_a_partial_line_are_not_lost(tmp_path) -> None:
    log = EventLog(tmp_path)
    log.write("step", step=1, loss=0.5)
    log.close()
    with (tmp_path / "events.jsonl").open("a", encoding="utf-8") as file:
        file.write('{"type": "step", "step": 2, "lo')  # a write cut short by a kill or a full disk
    log = EventLog(tmp_path)
    log.write("step", step=2, loss=0.25)
    log.write("step", step=3, loss=0.125)
    assert [e["step"] for e in read_events(tmp_path)] == [1, 2, 3]
    log.truncate_after(2)
    log.write("step", step=3, loss=0.0625)
    log.close()
    lines = (tmp_path / "events.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3], "the fragment is dropped"
    assert not stale_temporaries(tmp_path) and len(list(tmp_path.iterdir())) == 1


def test_corrupt_newest_checkpoint_falls_back_to_the_intact_one(tmp_path, reference, monkeypatch) -> None:
    config = write_config(tmp_path, saving={"keep_last": 2})
    run_dir = training.train(load_config(config))
    assert [s for s, _ in list_checkpoints(run_dir)] == [4, 6]
    broken = run_dir / "checkpoints" / "step-000006" / "lora.safetensors"
    broken.write_bytes(broken.read_bytes()[:-100])  # truncated, as by a full disk
    assert [s for s, _ in list_checkpoints(run_dir)] == [4]

    # an error now names the last intact checkpoint, not the broken newer one
    from trainers.models.sdxl import SDXLAdapter

    original = SDXLAdapter.training_loss
    monkeypatch.setattr(SDXLAdapter, "training_loss", lambda self, *a: original(self, *a) * float("nan"))
    with pytest.raises(training.TrainingError, match="loss became nan"):
        training.resume(run_dir)
    error = read_events(run_dir)[-1]
    assert error["type"] == "error" and error["last_checkpoint_step"] == 4
    assert error["last_checkpoint"].endswith("step-000004")
    monkeypatch.undo()

    training.resume(run_dir)
    warnings = [e["message"] for e in read_events(run_dir) if e["type"] == "warning"]
    assert any(str(broken) in w and "step-000004" in w for w in warnings), warnings
    assert [e for e in read_events(run_dir) if e["type"] == "resumed"][-1]["step"] == 4
    a, b = final_lora(run_dir), final_lora(reference)
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize(
    "damage",
    [
        lambda folder: (folder / "trainer_state.json").write_text('{"trainer": {"step": 6', encoding="utf-8"),
        lambda folder: (folder / "optimizer.safetensors").unlink(),
        lambda folder: (folder / "rng.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}"),
        lambda folder: (folder / "optimizer.safetensors").open("ab").write(b"extra"),
    ],
    ids=["json-cut", "file-missing", "header-garbage", "file-padded"],
)
def test_each_kind_of_damage_is_named(tmp_path, damage) -> None:
    from trainers.checkpoint import broken_checkpoints

    folder = tmp_path / "checkpoints" / "step-000006"
    shutil.copytree(_a_checkpoint(tmp_path), folder)
    assert list_checkpoints(tmp_path) and not broken_checkpoints(tmp_path)
    damage(folder)
    assert list_checkpoints(tmp_path) == []
    (problem,) = broken_checkpoints(tmp_path)
    assert problem.startswith(str(folder) + "/")


def _a_checkpoint(tmp_path: Path) -> Path:
    """A small but real checkpoint folder (tensors and JSON as save_checkpoint writes them)."""
    from trainers.checkpoint import TrainerState, save_checkpoint

    params = {"unet.w.lora_A.default.weight": torch.nn.Parameter(torch.ones(2, 3))}
    from ppsf_optim import ProdigyPlusScheduleFree

    optimizer = ProdigyPlusScheduleFree(list(params.values()))
    params["unet.w.lora_A.default.weight"].grad = torch.ones(2, 3)
    optimizer.step()
    source = tmp_path / "source"
    return save_checkpoint(source, TrainerState(6, 0, 0), params, optimizer, torch.Generator(), keep_last=1)


# ---------------------------------------------------------------- a full disk
def test_full_disk_ends_with_one_message_naming_the_last_checkpoint(tmp_path, monkeypatch, capsys) -> None:
    import trainers.checkpoint

    real_write, calls = trainers.checkpoint.write_safetensors, {"n": 0}

    def fill_up(path, tensors):
        calls["n"] += 1
        if calls["n"] == 4:  # the second checkpoint's first file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, tensors)

    monkeypatch.setattr(trainers.checkpoint, "write_safetensors", fill_up)
    config = write_config(tmp_path)
    assert cli(["train", str(config)]) == 1
    err = capsys.readouterr().err
    run_dir = tmp_path / "runs" / "r"
    assert "Traceback" not in err
    (message,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "the disk is full" in message and "step-000002 (step 2)" in message
    assert f"python -m trainers resume {run_dir}" in message
    error = read_events(run_dir)[-1]
    assert error["type"] == "error" and error["last_checkpoint_step"] == 2 and error["message"] in message
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name != "step-000002"]


def test_a_real_full_disk(tmp_path, reference) -> None:
    """A tiny tmpfs as the output folder: the run stops with the message, and resumes once there is room."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        pytest.skip("mounting a tiny tmpfs needs root on Linux")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        data = load_config(write_config(tmp_path)).model_copy(update={"output_dir": str(disk)})
        with pytest.raises(training.TrainingError) as raised:
            training.train(data)
        message = str(raised.value)
        assert "the disk is full" in message and "step-000002 (step 2)" in message, message
        assert "python -m trainers resume" in message
        run_dir = disk / "r"
        assert [s for s, _ in list_checkpoints(run_dir)] == [2]
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        training.resume(run_dir)
        a, b = final_lora(run_dir), final_lora(reference)
        assert all(torch.equal(a[k], b[k]) for k in b)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ---------------------------------------------------------------- stopping during start-up
@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_stop_during_start_up_is_clean_and_resumable(tmp_path, reference, sig) -> None:
    config = write_config(tmp_path)
    process = trainer_process("train", str(config))
    time.sleep(1.0)  # still importing torch and diffusers
    process.send_signal(sig)
    code, err = finish(process)
    assert code == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    run_dir = tmp_path / "runs" / "r"
    assert (run_dir / "config.toml").is_file()
    last = read_events(run_dir)[-1]
    assert last["type"] == "stopped" and last["message"] == "stopped before the first step; nothing to save"
    assert list_checkpoints(run_dir) == []
    training.resume(run_dir)
    assert_same_run(run_dir, reference)


def test_a_second_stop_aborts(tmp_path) -> None:
    previous = stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore(previous)
    assert not stop.requested() and signal.getsignal(signal.SIGINT) is previous[signal.SIGINT]


# ---------------------------------------------------------------- export refuses a tampered checkpoint
def _tamper_tensors(file: Path, change) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, str(file))


def _first(tensors: dict, part: str) -> str:
    return next(k for k in sorted(tensors) if part in k)


TAMPERINGS = {
    "z-missing": ("optimizer", lambda t: t.pop(_first(t, "z/")), "has no z/"),
    "z-scalar": ("optimizer", lambda t: t.update({_first(t, "z/"): torch.tensor(0.5)}), "has shape ()"),
    "z-broadcastable": (
        "optimizer",
        lambda t: t.update({_first(t, "z/"): t[_first(t, "z/")][:1].clone()}),
        "but the LoRA tensor has",
    ),
    "z-nan": ("optimizer", lambda t: t[_first(t, "z/")].view(-1).__setitem__(0, float("nan")), "NaN"),
    "lora-inf": (
        "lora",
        lambda t: t[_first(t, "lora_B")].view(-1).__setitem__(0, float("inf")),
        "NaN or inf",
    ),
    "beta1-zero": ("betas", 0.0, "beta1"),
    "beta1-one": ("betas", 1.0, "beta1"),
    "beta1-negative": ("betas", -0.5, "beta1"),
}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    return training.train(load_config(write_config(folder, training={"max_steps": 2})))


@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_export_refuses_a_tampered_checkpoint(tmp_path, small_run, case) -> None:
    run_dir = tmp_path / "r"
    shutil.copytree(small_run, run_dir, ignore=shutil.ignore_patterns("lora"))
    folder = run_dir / "checkpoints" / "step-000002"
    where, change, expected = TAMPERINGS[case]
    if where == "betas":
        document = json.loads((folder / "trainer_state.json").read_text())
        document["param_groups"][0]["betas"][0] = change
        (folder / "trainer_state.json").write_text(json.dumps(document))
        name = "unet."
    else:
        file = folder / f"{where}.safetensors"
        name = _first(load_file(file), "z/" if where == "optimizer" else "lora_B").removeprefix("z/")
        _tamper_tensors(file, change)
    with pytest.raises(ValueError, match="cannot export") as raised:
        export_checkpoint(run_dir, folder)
    assert expected in str(raised.value) and name in str(raised.value), str(raised.value)
    assert not (run_dir / "lora").exists()


def test_export_refuses_a_rank_that_is_not_the_configs(tmp_path, small_run) -> None:
    run_dir = tmp_path / "r"
    shutil.copytree(small_run, run_dir, ignore=shutil.ignore_patterns("lora"))
    folder = run_dir / "checkpoints" / "step-000002"
    name = _first(load_file(folder / "lora.safetensors"), "lora_A")

    def grow(tensors: dict, key: str) -> None:
        tensors[key] = torch.cat([tensors[key], tensors[key][:1]])  # rank 3 in a rank-2 run

    _tamper_tensors(folder / "lora.safetensors", lambda t: grow(t, name))
    _tamper_tensors(folder / "optimizer.safetensors", lambda t: grow(t, f"z/{name}"))
    with pytest.raises(ValueError, match="rank 2") as raised:
        export_checkpoint(run_dir, folder)
    module = name.removeprefix("unet.").split(".lora_A")[0]
    assert module in str(raised.value)
    assert not (run_dir / "lora").exists()


def test_the_untampered_checkpoint_exports(tmp_path, small_run) -> None:
    run_dir = tmp_path / "r"
    shutil.copytree(small_run, run_dir, ignore=shutil.ignore_patterns("lora"))
    assert [p.name for p in export_checkpoint(run_dir)] == ["r-step000002.safetensors"]


def test_temporary_names_are_recognised(tmp_path) -> None:
    path = temporary_sibling(tmp_path / "step-000002")
    path.mkdir()
    assert stale_temporaries(tmp_path) == [(path, "step-000002")]  # our own id: a leftover when we ask
