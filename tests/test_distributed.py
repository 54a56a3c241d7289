"""Several processes form one run (CPU, gloo): the same result as one process with the same global batch,
rank 0 alone writing, a crashed rank ending the run with an error event, resume on another process count.

Processes are started the way `accelerate launch` starts them (RANK, WORLD_SIZE, MASTER_ADDR, ... in the
environment), each with one thread and a timeout; one test goes through `accelerate launch` itself.
Run as a script, this file is the worker of the optimizer-level test (torch only, no trainer).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PROCESS_TIMEOUT_S = 240


# ---------------------------------------------------------------- launching
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    port = _free_port()
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
    port = str(_free_port())
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


if __name__ == "__main__":
    _optimizer_worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
