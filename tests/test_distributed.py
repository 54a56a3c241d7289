"""Several processes form one run (CPU, gloo): the same result as one process with the same global batch,
rank 0 alone writing, a crashed rank ending the run with an error event, resume on another process count.

Processes are started the way `accelerate launch` starts them (RANK, WORLD_SIZE, MASTER_ADDR, ... in the
environment), each with one thread and a timeout; one test goes through `accelerate launch` itself.
Run as a script, this file is the worker of the optimizer-level test (torch only, no trainer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_helpers import config_builder

from trainers.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
PROCESS_TIMEOUT_S = 240


# ---------------------------------------------------------------- launching
def _environment(rank: int, world: int, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PPSF_DIST_TIMEOUT_S="60",
        PYTHONPATH=str(REPO),
    )
    env.update(extra or {})
    return env


def launch(
    command: list[str], world: int, log_dir: Path, rank_env: dict[int, dict[str, str]] | None = None
) -> list[int]:
    """Start `command` on `world` processes as a launcher would; their exit codes. Every process is ended
    by the timeout at the latest; logs go to log_dir/rank-N.log."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = []
    try:
        for rank in range(world):
            log = (log_dir / f"rank-{rank}.log").open("w")
            env = _environment(rank, world, port, (rank_env or {}).get(rank))
            processes.append(
                subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            )
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()


def logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("rank-*.log")))


def trainer_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainers", *args]


# ---------------------------------------------------------------- the optimizer alone (torch only)
def _train_mlp(mode: str, rank: int = 0, world: int = 1) -> dict:
    """6 steps of a small MLP on a fixed global batch of 16 rows split over `world` ranks; d and weights.
    mode: "plain" (DDP, optimizer.step()), "fused" (ppsf_optim.ddp), "single" (one process, all rows)."""
    from torch.nn.parallel import DistributedDataParallel

    from ppsf_optim import ProdigyPlusScheduleFree
    from ppsf_optim.ddp import attach_fused_ddp, same_on_all_ranks

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 4),
    )
    generator = torch.Generator().manual_seed(1)
    inputs, targets = torch.randn(6, 16, 8, generator=generator), torch.randn(6, 16, 4, generator=generator)
    params = list(model.parameters())
    optimizer = ProdigyPlusScheduleFree([{"params": params[:4]}, {"params": params[4:], "lr": 0.5}], d0=1e-3)
    net = model
    if mode != "single":
        # ~300 bytes per bucket: every parameter has a bucket of its own, so buckets complete in any order
        net = DistributedDataParallel(model, bucket_cap_mb=0.0003, gradient_as_bucket_view=True)
        if mode == "fused":
            attach_fused_ddp(net, optimizer)
    rows = slice(rank * 16 // world, (rank + 1) * 16 // world)
    for step in range(6):
        loss = torch.nn.functional.mse_loss(net(inputs[step, rows]), targets[step, rows])
        loss.backward()
        optimizer.step()
        if mode != "fused":
            optimizer.zero_grad(set_to_none=True)
    result = {"d": [g["d"] for g in optimizer.param_groups], "weights": [p.tolist() for p in params]}
    if mode != "single":
        result["d_same"] = same_on_all_ranks(result["d"])
    return result


def _optimizer_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from ppsf_optim.ddp import same_on_all_ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {mode: _train_mlp(mode, rank, world) for mode in ("plain", "fused")}
    results["differs_detected"] = not same_on_all_ranks([float(rank)])  # the check can fail
    dist.destroy_process_group()
    Path(out).write_text(json.dumps(results))


def test_ddp_two_processes_equal_one_process_with_the_whole_batch(tmp_path) -> None:
    """2 processes x 8 rows = 1 process x 16 rows with ordinary step(), both with plain DDP and with the
    fused pass (each bucket stepped when its all-reduce completes); d bitwise the same on both ranks."""
    port = str(free_port())
    outputs = [tmp_path / f"rank-{rank}.json" for rank in range(2)]
    script = [sys.executable, str(Path(__file__).resolve())]
    processes = [
        subprocess.Popen([*script, str(rank), "2", port, str(outputs[rank])], env=_environment(rank, 2, 0))
        for rank in range(2)
    ]
    try:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        reference = _train_mlp("single")
        torch.set_num_threads(previous)
        assert [p.wait(timeout=PROCESS_TIMEOUT_S) for p in processes] == [0, 0]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    ranks = [json.loads(o.read_text()) for o in outputs]
    assert ranks[0]["differs_detected"] and ranks[1]["differs_detected"]
    assert reference["d"][0] > 1e-3 * 1.1, "d should have grown from d0"
    for mode in ("plain", "fused"):
        first, second = ranks[0][mode], ranks[1][mode]
        assert first["d"] == second["d"] and first["d_same"] and second["d_same"], mode
        assert first["weights"] == second["weights"], mode
        assert first["d"] == pytest.approx(reference["d"], rel=1e-6), mode
        for got, expected in zip(first["weights"], reference["weights"]):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the trainer
@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes (OMP_NUM_THREADS=1), so their floats are ours
    yield
    torch.set_num_threads(previous)


make_config = config_builder(
    training={"max_steps": 4, "batch_size": 1},
    optimizer={"fused_back_pass": False},
    saving={"every_n_steps": 2, "formats": ["kohya"]},
)


def write_config(tmp_path: Path, data: dict) -> Path:
    import tomli_w

    path = tmp_path / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def train_here(data: dict) -> Path:
    """The same config on this one process."""
    from trainers import train as training
    from trainers.config import validate_config

    return training.train(validate_config(data))


def steps(run_dir: Path) -> list[dict]:
    from trainers.events import read_events

    return [e for e in read_events(run_dir) if e["type"] == "step"]


def checkpoint_lora(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / f"step-{step:06d}" / "lora.safetensors")


def assert_same_training(run_dir: Path, reference: Path, step: int) -> None:
    """Losses, d and the LoRA of `run_dir` equal the reference run's (float tolerance: the sums differ)."""
    got, expected = steps(run_dir), steps(reference)
    assert [e["step"] for e in got] == [e["step"] for e in expected]
    assert [e["loss"] for e in got] == pytest.approx([e["loss"] for e in expected], rel=1e-5)
    d_got = [g["d"] for e in got for g in e["groups"]]
    d_expected = [g["d"] for e in expected for g in e["groups"]]
    assert d_expected[-1] > d_expected[0], "d should have grown from d0"
    assert d_got == pytest.approx(d_expected, rel=1e-5)
    a, b = checkpoint_lora(run_dir, step), checkpoint_lora(reference, step)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_accelerate_launch_makes_one_run_equal_to_one_process_and_resumable_on_one(
    tmp_path, tiny_model, dataset, one_thread
) -> None:
    """`accelerate launch` with 2 processes, batch 1, accumulation 2 (no_sync on the first micro-batch) is
    one run with a global batch of 4: the same as 1 process accumulating 4; rank 0 alone writes events,
    checkpoints, samples and exports; its step-2 checkpoint resumed on 1 process ends where it ended."""
    import shutil

    from trainers import train as training
    from trainers.events import read_events

    lora = {"dropout": 0.2}  # drawn from torch's global RNG: the same per micro-batch on any process too
    data = make_config(
        tmp_path / "two",
        tiny_model,
        dataset,
        lora=lora,
        training={"gradient_accumulation": 2},
        sampling={"prompts": ["shapes, a red circle"], "every_n_steps": 0},
    )
    config = write_config(tmp_path / "two", data)
    # --multi_gpu is accelerate's torchrun launcher, which also starts CPU processes (gloo)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(free_port()), "-m", "trainers", "train", str(config)]
    env = {k: v for k, v in _environment(0, 1, 0).items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    launched = subprocess.run(
        command, env=env, cwd=REPO, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    run_dir = tmp_path / "two" / "runs" / "run"

    events = read_events(run_dir)
    starts = [e for e in events if e["type"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2 and starts[0]["global_batch_size"] == 4
    assert [e["step"] for e in steps(run_dir)] == [1, 2, 3, 4]
    assert all(e["samples"] == 4 and e["samples_per_second"] > 0 for e in steps(run_dir))
    assert [e["type"] for e in events].count("done") == 1
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [2, 4]
    assert len(list((run_dir / "samples").iterdir())) == 1
    assert len(list((run_dir / "lora").iterdir())) == 1

    reference = train_here(
        make_config(tmp_path / "one", tiny_model, dataset, lora=lora, training={"gradient_accumulation": 4})
    )
    assert_same_training(run_dir, reference, step=4)

    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    shutil.rmtree(resumed / "lora")
    training.resume(resumed)  # on this one process: it accumulates the 4 micro-batches itself
    assert_same_training(resumed, reference, step=4)


def test_fused_pass_on_two_processes_equals_one_process_accumulating(
    tmp_path, tiny_model, dataset, one_thread
) -> None:
    """The fused backward pass under DDP (buckets stepped as their all-reduce completes), 2 processes x
    batch 2, equals the plain step on 1 process accumulating 2 micro-batches of 2. Every checkpoint checked
    that d is the same on both ranks (a mismatch would have ended the run with an error)."""
    lora = {"train_text_encoder": True}  # 3 groups with a d each, and LoRA layers that get no gradient
    data = make_config(
        tmp_path / "two",
        tiny_model,
        dataset,
        lora=lora,
        training={"batch_size": 2},
        optimizer={"fused_back_pass": True},
    )
    log_dir = tmp_path / "logs"
    returncodes = launch(trainer_command("train", str(write_config(tmp_path / "two", data))), 2, log_dir)
    assert returncodes == [0, 0], logs(log_dir)
    reference = train_here(
        make_config(
            tmp_path / "one",
            tiny_model,
            dataset,
            lora=lora,
            training={"batch_size": 2, "gradient_accumulation": 2},
        )
    )
    assert_same_training(tmp_path / "two" / "runs" / "run", reference, step=4)


def test_a_crashed_rank_ends_the_run_with_an_error_event_and_a_resumable_checkpoint(
    tmp_path, tiny_model, dataset, one_thread
) -> None:
    from trainers import train as training
    from trainers.events import read_events

    data = make_config(tmp_path, tiny_model, dataset, training={"max_steps": 6})
    log_dir = tmp_path / "logs"
    returncodes = launch(
        trainer_command("train", str(write_config(tmp_path, data))),
        2,
        log_dir,
        rank_env={1: {"PPSF_FAULT": "train-step:3"}},  # rank 1 is killed in its third step
    )
    assert returncodes[1] == -9 and returncodes[0] not in (0, None), logs(log_dir)
    run_dir = tmp_path / "runs" / "run"
    last = read_events(run_dir)[-1]
    assert last["type"] == "error" and last["last_checkpoint_step"] == 2, last
    assert last["message"].startswith("a process of this run failed or could not be reached"), last
    training.resume(run_dir)
    events = read_events(run_dir)
    assert events[-1]["type"] == "done" and events[-1]["step"] == 6
    assert [e["step"] for e in steps(run_dir)] == [1, 2, 3, 4, 5, 6]


def test_d_differing_between_processes_at_a_checkpoint_is_an_error_event(
    tmp_path, tiny_model, dataset, monkeypatch, one_thread
) -> None:
    from trainers import train as training
    from trainers.distributed import DataParallel
    from trainers.events import read_events

    monkeypatch.setattr(DataParallel, "d_agrees", lambda self, optimizer: False)  # as if ranks drifted
    with pytest.raises(training.TrainingError, match="d differs between processes at step 2"):
        train_here(make_config(tmp_path, tiny_model, dataset))
    last = read_events(tmp_path / "runs" / "run")[-1]
    assert last["type"] == "error" and "d differs" in last["message"]
    assert not (tmp_path / "runs" / "run" / "checkpoints").exists()


def test_distributed_refusals_name_the_field(tiny_model, dataset, tmp_path) -> None:
    from trainers.checks import distributed_problems
    from trainers.config import validate_config

    fused = validate_config(make_config(tmp_path, tiny_model, dataset, optimizer={"fused_back_pass": True}))
    assert distributed_problems(fused, 2, 2) == []
    assert distributed_problems(fused, 1, 1) == []
    (problem,) = distributed_problems(fused, 1, 2)  # a 2-process fused run resumed on 1
    assert problem.startswith("optimizer.fused_back_pass:")
    plain = validate_config(make_config(tmp_path, tiny_model, dataset))
    assert distributed_problems(plain, 1, 2) == []  # 1 process accumulates what 2 shared


def test_micro_batches_per_step_on_any_number_of_processes() -> None:
    from trainers.distributed import micro_batches_per_step

    assert micro_batches_per_step(0, 2, 4) == (8, None)  # a new run: accumulation x processes
    assert micro_batches_per_step(4, 2, 1) == (4, None)  # resumed on fewer: each accumulates more
    assert micro_batches_per_step(4, 2, 4) == (4, None)
    count, warning = micro_batches_per_step(2, 1, 4)  # written on 2, resumed on 4: a larger global batch
    assert count == 4 and "global batch changes" in warning


def test_gpus_flag_refuses_before_any_process_starts(tmp_path, tiny_model, dataset, monkeypatch, capsys):
    from trainers import distributed
    from trainers.__main__ import main as cli

    def no_launch(command):
        raise AssertionError("a process was started")

    monkeypatch.setattr(distributed, "run_launched", no_launch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = write_config(tmp_path, make_config(tmp_path, tiny_model, dataset))
    assert cli(["train", str(config), "--gpus", "2"]) == 2
    assert "--gpus: 2 GPUs asked for, 0 found" in capsys.readouterr().err
    assert cli(["train", str(config), "--gpus", "2", "--set", "dataset.path=/nowhere"]) == 2
    assert "dataset.path" in capsys.readouterr().err


def test_gpus_flag_starts_accelerate_for_train_and_resume(
    tmp_path, tiny_model, dataset, monkeypatch, capsys
) -> None:
    from safetensors.torch import save_file

    from trainers import distributed
    from trainers.__main__ import main as cli

    started = []
    monkeypatch.setattr(distributed, "run_launched", lambda command: started.append(command) or 0)
    monkeypatch.setattr(distributed, "gpu_problems", lambda processes: [])
    config = write_config(
        tmp_path, make_config(tmp_path, tiny_model, dataset, optimizer={"fused_back_pass": True})
    )
    assert cli(["train", str(config), "--gpus", "2", "--set", "training.seed=3"]) == 0
    (command,) = started
    assert command[1:6] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    assert command[command.index("trainers") :] == [
        "trainers",
        "train",
        str(config),
        "--set",
        "training.seed=3",
    ]

    # a 2-process fused run resumed on 1 GPU would have to accumulate: refused before any process starts
    run_dir = tmp_path / "runs" / "run"
    checkpoint = run_dir / "checkpoints" / "step-000002"
    checkpoint.mkdir(parents=True)
    state = {"step": 2, "epoch": 0, "batch_in_epoch": 4, "micro_batches_per_step": 2}
    (checkpoint / "trainer_state.json").write_text(json.dumps({"trainer": state, "param_groups": []}))
    for name in ("lora", "optimizer", "rng"):
        save_file({"x": torch.zeros(1)}, checkpoint / f"{name}.safetensors")
    (run_dir / "config.toml").write_text(config.read_text())
    started.clear()
    capsys.readouterr()
    assert cli(["resume", str(run_dir), "--gpus", "1"]) == 2
    assert "optimizer.fused_back_pass:" in capsys.readouterr().err and not started
    assert cli(["resume", str(run_dir), "--gpus", "2"]) == 0
    assert started[0][started[0].index("trainers") :] == ["trainers", "resume", str(run_dir)]

    # one GPU needs no launcher: the run starts in this process
    from trainers import train as training

    monkeypatch.setattr(training, "train", lambda config: started.append(config.name) or tmp_path)
    assert cli(["train", str(config), "--gpus", "1", "--set", "name=other"]) == 0
    assert started[-1] == "other" and len(started) == 2


if __name__ == "__main__":
    _optimizer_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
