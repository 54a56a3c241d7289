"""Data-parallel training: the processes `accelerate launch` starts form one run (torch DDP underneath).

Every process runs the same loop (trainers/train.py) on every model family; this module is all that
differs between them:
  - the process group is set up by accelerate from the launcher's environment (gloo on CPU, nccl on GPUs);
    one process is just the plain loop, with nothing set up;
  - all ranks walk the same epoch order of micro-batches (trainers/batches.py); a step takes
    `micro_batches_per_step` of them, and rank r trains on positions r, r + world, r + 2*world, ...
    (gradient accumulation makes up the rest), so the data position is the same on every rank and does not
    depend on how many processes there are; a micro-batch's noise, timesteps, captions and dropout are
    seeded from (seed, step, position), so which process trains it does not matter either;
  - the LoRA gradients are averaged by DDP: `no_sync` on all but the last micro-batch of a step, or, with the
    fused backward pass, ppsf_optim.ddp steps each bucket as soon as its all-reduce completes;
  - rank 0 alone fills the caches first (the others wait, then read them) and writes events, samples,
    checkpoints and exports; the others get a log that drops events;
  - once per step two small all-reduces agree on the global loss and samples of all ranks, and on whether
    any rank was asked to stop, so all stop at the same step; at each checkpoint Prodigy's d is compared across
    ranks (a mismatch stops the run with an error event instead of drifting silently).

A rank that dies makes the next collective fail on the others (gloo: at once; nccl: the launcher ends them),
within PPSF_DIST_TIMEOUT_S (default 1800 s) if it hangs instead; rank 0 then writes the error event naming
the last checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from trainers.atomic import fault_point
from trainers.events import EventLog

TIMEOUT_ENV = "PPSF_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800
# rank 0 fills the caches (maybe hours) while the others wait on this group, so its timeout is long
_WAIT_TIMEOUT = timedelta(hours=24)

T = TypeVar("T")


class DataParallel:
    """This process's place in the run (rank 0 of 1 when not launched distributed) and the collectives."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | None = None,
        wait_group: Any | None = None,
    ) -> None:
        self.rank, self.world_size = rank, world_size
        self.device = device if device is not None else _default_device()
        self._wait_group = wait_group
        self._model: torch.nn.Module | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ setup and teardown
    def close(self) -> None:
        """Leave the process group (a no-op on one process)."""
        import torch.distributed as dist

        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def event_log(self, run_dir: Path) -> EventLog | _DroppedEvents:
        return EventLog(run_dir) if self.is_main else _DroppedEvents()

    def main_first(self, work: Callable[[], T], failure: type[Exception]) -> T:
        """Run `work` on rank 0, then on the others once it is done (they find the caches filled). If it
        fails on rank 0 the others raise `failure` instead of waiting."""
        result = self.main_only(work, failure)
        return result if self.is_main else work()

    def main_only(self, work: Callable[[], T], failure: type[Exception]) -> T | None:
        """Run `work` on rank 0 while the others wait (None for them). If it fails on rank 0 the others
        raise `failure` with its message instead of waiting."""
        if not self.enabled:
            return work()
        if self.is_main:
            try:
                result = work()
            except Exception as error:
                self._broadcast_text(f"{type(error).__name__}: {error}")
                raise
            self._broadcast_text("")
            return result
        message = self._broadcast_text("")
        if message:
            raise failure(f"process 0 failed, so this process stops too: {message}")
        return None

    def main_text(self, text: str) -> str:
        """Process 0's `text` on every process (`text` itself when there is one process)."""
        return self._broadcast_text(text) if self.enabled else text

    def _broadcast_text(self, text: str) -> str:
        """Rank 0's `text` on every rank (as UTF-8 bytes in tensors: nothing is pickled)."""
        import torch.distributed as dist

        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
        length = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(length, src=0, group=self._wait_group)
        if not self.is_main:
            data = torch.empty(int(length.item()), dtype=torch.uint8)
        if int(length.item()):
            dist.broadcast(data, src=0, group=self._wait_group)
        return bytes(data.tolist()).decode("utf-8")

    # ------------------------------------------------------------------ data
    def my_positions(self, micro_batches_per_step: int) -> range:
        """Positions within the step's micro-batches that this rank trains on."""
        return range(self.rank, micro_batches_per_step, self.world_size)

    # ------------------------------------------------------------------ the model
    def training_loss(
        self, adapter: Any, optimizer: Any, fused_back_pass: bool
    ) -> Callable[..., torch.Tensor]:
        """The function giving a micro-batch's per-sample loss, through DDP when distributed; attaches the
        fused backward pass (one process: post-accumulate-grad hooks; DDP: the bucket comm hook)."""
        if not self.enabled:
            if fused_back_pass:
                optimizer.attach_fused_backward()
            return adapter.training_loss
        from torch.nn.parallel import DistributedDataParallel

        from ppsf_optim.ddp import attach_fused_ddp

        module = _AdapterLoss(adapter)
        # only the LoRA is trained: the frozen base weights and buffers are neither broadcast nor reduced
        ignored = [name for name, p in module.named_parameters() if not p.requires_grad]
        ignored += [name for name, _ in module.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignored)
        model = DistributedDataParallel(
            module,
            device_ids=[self.device] if self.device.type == "cuda" else None,
            forward_sync_buffers=False,
            gradient_as_bucket_view=True,  # gradients are views of the buckets: no second copy
            # some LoRA layers may never get a gradient (SDXL reads its text encoders' penultimate layer)
            find_unused_parameters=True,
        )
        if fused_back_pass:
            attach_fused_ddp(model, optimizer)
        self._model = model
        return model

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: no gradient all-reduce unless it is the step's last."""
        if self._model is None or last:
            return contextlib.nullcontext()
        return self._model.no_sync()

    # ------------------------------------------------------------------ per step
    def step_totals(self, loss_sum: float, micro_batches: int, samples: int) -> tuple[float, int]:
        """(mean loss over all ranks' micro-batches, samples of all ranks)."""
        fault_point("train-step")  # tests kill one rank here
        if not self.enabled:
            return loss_sum / micro_batches, samples
        totals = self._sum([loss_sum, micro_batches, samples])
        return totals[0] / totals[1], int(totals[2])

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (a stop asked of one process stops all at the same step)."""
        return flag if not self.enabled else self._sum([float(flag)])[0] > 0

    def _sum(self, values: list[float]) -> list[float]:
        import torch.distributed as dist

        totals = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(totals)
        return totals.tolist()

    def same_on_all_ranks(self, values: list[float]) -> bool:
        """Whether `values` are the same on every rank (one all-reduce of min and max)."""
        if not self.enabled:
            return True
        from ppsf_optim.ddp import same_on_all_ranks

        return same_on_all_ranks(values)

    def d_agrees(self, optimizer: Any) -> bool:
        """Whether every rank has the same d in every group (always true on one process)."""
        return self.same_on_all_ranks([g["d"] for g in optimizer.param_groups])

    def failure_message(self, error: BaseException) -> str:
        """The error event's message: a failed collective says that another process failed."""
        message = f"{type(error).__name__}: {error}"
        if self.enabled and _is_communication_error(error):
            return (
                f"a process of this run failed or could not be reached, so process {self.rank} stopped too "
                f"(see the failed process's output for why; here: {message}). Continue from the last "
                "checkpoint with `python -m trainers resume RUN_DIR`, on any number of processes."
            )
        return message

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _is_communication_error(error: BaseException) -> bool:
    import torch.distributed as dist

    text = str(error)
    return isinstance(error, dist.DistError) or any(
        word in text for word in ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out")
    )


class _AdapterLoss(torch.nn.Module):
    """What DDP wraps: the trained modules as submodules (so DDP finds the LoRA parameters), and a forward
    that is the adapter's training loss, so every family goes through DDP the same way."""

    def __init__(self, adapter: Any) -> None:
        super().__init__()
        self.trained = torch.nn.ModuleDict(adapter.lora_modules())
        self._adapter = [adapter]  # in a list: not a submodule

    def forward(self, *args: Any) -> torch.Tensor:
        return self._adapter[0].training_loss(*args)


class _DroppedEvents:
    """The event log of ranks other than 0: rank 0 writes the run's events."""

    def write(self, event_type: str, **fields: Any) -> dict[str, Any]:
        return {"type": event_type, **fields}

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def from_environment() -> DataParallel:
    """This process's DataParallel: set up through accelerate when a launcher started several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DataParallel()
    import torch.distributed as dist
    from accelerate import PartialState

    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    on_cpu = not torch.cuda.is_available()
    kwargs = {"cpu": True, "backend": "gloo"} if on_cpu else {}
    state = PartialState(timeout=timeout, **kwargs)
    # control messages (cache filled, rank 0 failed) go through gloo with a long timeout
    wait_group = dist.new_group(backend="gloo", timeout=_WAIT_TIMEOUT)
    device = torch.device(state.device)
    device = torch.device("cpu") if device.type == "cpu" else device
    return DataParallel(state.process_index, state.num_processes, device, wait_group)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def micro_batches_per_step(saved: int, accumulation: int, processes: int) -> tuple[int, str | None]:
    """Micro-batches per step over all processes, and a warning when a resumed run's global batch changes.

    A resumed run keeps its checkpoint's count (`saved`; 0 for a new run) when `processes` divide it: it
    goes on exactly as it would have (fewer processes accumulate more). Otherwise it continues from the
    same data position with `accumulation` micro-batches per process, a different global batch.
    """
    if saved and saved % processes == 0:
        return saved, None
    count = accumulation * processes
    if not saved:
        return count, None
    return count, (
        f"this run took {saved} micro-batches per step, which {processes} processes cannot share evenly: it "
        f"continues from the same data position with {count} per step (training.gradient_accumulation x "
        f"processes), so its global batch changes; resume on a number of processes dividing {saved} to go "
        "on exactly as before"
    )


# ---------------------------------------------------------------- starting processes on this machine
def launch_command(trainer_args: list[str], processes: int, port: int) -> list[str]:
    """`accelerate launch` of `python -m trainers TRAINER_ARGS` on `processes` processes of this machine."""
    import sys

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    command += ["--num_processes", str(processes), "--num_machines", "1", "--main_process_port", str(port)]
    # the trainer sets precision itself (training.precision); accelerate's flags would only warn
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainers", *trainer_args]
    return command


def gpu_problems(processes: int) -> list[str]:
    """Why `--gpus processes` cannot start here (one process per GPU of this machine)."""
    if processes < 1:
        return [f"--gpus: {processes} is not a number of GPUs; give 1 or more"]
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if processes > found:
        return [
            f"--gpus: {processes} GPUs asked for, {found} found on this machine; give at most {found}, or "
            "start the processes with `accelerate launch` yourself (e.g. several machines)"
        ]
    return []


def run_launched(command: list[str]) -> int:
    """Run the launcher and wait; a SIGTERM (the UI's stop) is passed on so every process stops at the
    same step with a checkpoint. Ctrl-C reaches the processes from the terminal by itself."""
    import signal
    import subprocess

    child = subprocess.Popen(command)
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum)),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
    }
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def free_port() -> int:
    """A TCP port free on this machine now, for the processes' rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
