"""Live controls of a running trainer: freeze d, sample, checkpoint, stop.

The channel is a folder of small request files, runs/<name>/control/<time_ns>-<action>.json, each written
atomically by `request_control` (the CLI's `python -m trainers control RUN ACTION` and the UI call it). The
trainer lists that folder once per step (one directory read: nothing next to a training step), acts on each
request in the order they came, acknowledges it with a `control` event, and only then deletes the file.

Whether a run is running is the trainer's own lock: it holds an exclusive flock on runs/<name>/trainer.lock
from start to exit, which the system releases when the process dies, so a killed trainer leaves no stale
"running" behind and a request to a run that is not running is refused at once. A request left over from a
trainer that died before acting on it is older than the next trainer's start: that one acknowledges it as
refused instead of acting on a click made for another process.

Standard library only (the UI imports it without torch).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from trainers.atomic import atomic_write_text

ACTIONS = ("freeze", "sample", "checkpoint", "stop")
CONTROL_DIR = "control"
LOCK_FILE = "trainer.lock"


class ControlError(RuntimeError):
    """A control request that cannot be sent; the message says why and what to do."""


@dataclass(frozen=True)
class ControlRequest:
    id: str  # the request file's stem, also in the acknowledging event
    action: str
    requested_at: float
    path: Path


def trainer_running(run_dir: Path) -> bool:
    """Whether a trainer holds this run's lock right now."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's shared lock, if it got one
    return False


def request_control(run_dir: Path, action: str) -> str:
    """Ask the trainer running in `run_dir` to `action` at its next step; returns the request id (the
    `request` field of the `control` event that acknowledges it). Raises ControlError when the action is
    unknown or the run is not running."""
    run_dir = Path(run_dir)
    if action not in ACTIONS:
        raise ControlError(f"unknown control action {action!r}; use one of {', '.join(ACTIONS)}")
    if not run_dir.is_dir():
        raise ControlError(f"{run_dir} is not a run folder")
    if not trainer_running(run_dir):
        raise ControlError(
            f"{run_dir.name} is not running, so it cannot {action}; "
            f"resume it with `python -m trainers resume {run_dir}` first"
        )
    now = time.time()
    request_id = f"{time.time_ns():020d}-{action}"
    atomic_write_text(
        run_dir / CONTROL_DIR / f"{request_id}.json",
        json.dumps({"action": action, "requested_at": now, "pid": os.getpid()}),
    )
    return request_id


class ControlChannel:
    """The trainer's end: holds the run lock and reads the requests."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / CONTROL_DIR
        self._lock_fd: int | None = None
        self.started = 0.0
        self.stop_requested = False

    def acquire(self) -> None:
        """Take the run's lock; raises ControlError when another trainer holds it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        for _ in range(20):  # a request_control probing the lock holds it for microseconds
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        else:
            os.close(fd)
            raise ControlError(
                f"another trainer is running in {self.run_dir}; wait for it to finish or stop it "
                f"(`python -m trainers control {self.run_dir} stop`)"
            )
        self._lock_fd = fd
        self.started = time.time()

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the only descriptor releases the lock
            self._lock_fd = None

    def pending(self) -> list[ControlRequest]:
        """The requests waiting, oldest first (an unreadable file is skipped and removed)."""
        try:
            names = sorted(entry.name for entry in os.scandir(self.folder) if entry.name.endswith(".json"))
        except FileNotFoundError:
            return []
        requests = []
        for name in names:
            if name.startswith("."):  # a request still being written (atomic_write's temporary)
                continue
            path = self.folder / name
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
                requests.append(
                    ControlRequest(
                        id=path.stem,
                        action=document["action"],
                        requested_at=float(document["requested_at"]),
                        path=path,
                    )
                )
            except (OSError, ValueError, KeyError, TypeError):
                path.unlink(missing_ok=True)
        return requests

    def is_stale(self, request: ControlRequest) -> bool:
        """Sent before this trainer started: meant for one that is gone."""
        return request.requested_at < self.started

    @staticmethod
    def done(request: ControlRequest) -> None:
        with contextlib.suppress(FileNotFoundError):
            request.path.unlink()
