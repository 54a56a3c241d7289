"""Starting, stopping and resuming the trainer as a child process; the run folder keeps everything.

A started trainer gets runs/<name>/trainer.pid (so a restarted UI finds it again) and writes its output
to runs/<name>/train.log. Whether a run is going is read from that pid file each time it is asked.
Commands are argument lists, never shell strings, so typed paths are never interpreted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from trainers.atomic import atomic_write_text
from trainers.checkpoint import list_checkpoints
from trainers.config import TrainConfig, dump_config
from trainers.events import EVENTS_FILE

PID_FILE = "trainer.pid"
LOG_FILE = "train.log"
STOP_FILE = "ui-stop.json"  # which trainer pid the UI already sent its one stop signal to
LOCK_FILE = ".ui.lock"  # in the runs folder: held while a Start or Resume checks and spawns
REQUEST_FILE = "ui-config.toml"  # the config as submitted; the trainer writes the resolved config.toml
REPO_ROOT = Path(__file__).resolve().parent.parent

# Our own children, so their exit is reaped (a zombie would look alive). Status never comes from here.
_children: dict[int, subprocess.Popen] = {}


class RunnerError(RuntimeError):
    """A start/stop/resume that cannot happen; the message says why and what to do."""


# ---------------------------------------------------------------- commands
def trainer_command(action: str, target: Path, gpus: int = 1) -> list[str]:
    """[python, -m, trainers, action, target]: the argument list a trainer is started with; on several
    GPUs of this machine, `--gpus N` (the trainer starts one process per GPU through accelerate)."""
    return [
        sys.executable,
        "-m",
        "trainers",
        action,
        str(target),
        *(["--gpus", str(gpus)] if gpus > 1 else []),
    ]


def gpu_count() -> int:
    """CUDA devices this machine has (0 without CUDA): the UI offers a GPU count where there are two or more."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@contextlib.contextmanager
def runs_lock(runs_dir: Path) -> Iterator[None]:
    """Hold the runs folder's exclusive lock (runs/.ui.lock): one check-and-spawn at a time.

    An flock on a file, so it holds between threads of this UI, between UIs on the same folder and across
    a UI restart; the system releases it when the holder exits, so a killed UI leaves no stale lock.
    """
    Path(runs_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(runs_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def start_run(config: TrainConfig, allow_parallel: bool = False, gpus: int = 1) -> Path:
    """Write the config into its run folder and start `python -m trainers train` on it; returns the folder.

    Raises RunnerError if another run in the runs folder is training (unless `allow_parallel`), the folder
    already holds a run (resume it instead) or a trainer is running there. The check and the spawn happen
    under runs_lock, so two requests at once cannot both pass the check.
    """
    run_dir = Path(config.run_dir).resolve()
    with runs_lock(run_dir.parent):
        _refuse_if_busy(run_dir, allow_parallel)
        if trainer_pid(run_dir) is not None:
            raise RunnerError(f"a trainer is already running in {run_dir}")
        if holds_run(run_dir):
            raise RunnerError(
                f"run folder {run_dir} already holds a run: resume it on the Run tab, or choose another name"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        request = run_dir / REQUEST_FILE
        atomic_write_text(request, dump_config(config))
        _spawn(trainer_command("train", request, gpus), run_dir)
    return run_dir


def resume_run(run_dir: Path, allow_parallel: bool = False, gpus: int = 1) -> Path:
    """Start `python -m trainers resume RUN_DIR`; returns the folder. Raises RunnerError if it cannot.

    Checked and spawned under runs_lock, as start_run.
    """
    run_dir = Path(run_dir).resolve()
    with runs_lock(run_dir.parent):
        _refuse_if_busy(run_dir, allow_parallel)
        if trainer_pid(run_dir) is not None:
            raise RunnerError(f"{run_dir.name} is still running; stop it before resuming")
        if not (run_dir / "config.toml").is_file():
            raise RunnerError(
                f"{run_dir.name} has nothing to resume: its trainer stopped before it wrote config.toml "
                "(see its train.log). Start it again from the Setup tab; the same name is fine."
            )
        _spawn(trainer_command("resume", run_dir, gpus), run_dir)
    return run_dir


def _refuse_if_busy(run_dir: Path, allow_parallel: bool) -> None:
    refusal = one_at_a_time_refusal(run_dir.parent, allow_parallel, run_dir)
    if refusal:
        raise RunnerError(f"{refusal}.")


StopAnswer = Literal["sent", "already stopping", "not running"]


def request_stop(run_dir: Path) -> StopAnswer:
    """Ask the run's trainer to stop, once: a trainer aborts at once on a second SIGINT, losing the steps
    since its last checkpoint, so a repeated Stop (another page, a double click) sends nothing.

    The pid the signal went to is written to the run folder (so a restarted UI knows too), under the runs
    lock (so two presses at once cannot both send).
    """
    run_dir = Path(run_dir).resolve()
    with runs_lock(run_dir.parent):
        pid = trainer_pid(run_dir)
        if pid is None:
            return "not running"
        if stop_sent_to(run_dir) == pid:
            return "already stopping"
        atomic_write_text(run_dir / STOP_FILE, json.dumps({"pid": pid, "time": time.time()}))
        return "sent" if stop_run(run_dir) else "not running"


def abort_run(run_dir: Path) -> bool:
    """Make the run's trainer quit now, without a checkpoint (what a second Ctrl-C does); False if none runs.

    The trainer treats SIGTERM as Ctrl-C, so the stop request (if not sent yet) and a second one are sent.
    """
    run_dir = Path(run_dir).resolve()
    if request_stop(run_dir) == "not running":
        return False
    return stop_run(run_dir, signal.SIGTERM)  # another signal number: never merged with a pending SIGINT


def stop_sent_to(run_dir: Path) -> int | None:
    """The trainer pid the UI already sent its stop signal to, or None."""
    try:
        return int(json.loads((Path(run_dir) / STOP_FILE).read_text(encoding="utf-8"))["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stop_run(run_dir: Path, sig: int = signal.SIGINT) -> bool:
    """Send `sig` to the run's trainer (SIGINT: it finishes the step, checkpoints, logs "stopped"; a second
    one aborts it); False if none runs. The UI goes through request_stop, which sends it once."""
    pid = trainer_pid(run_dir)
    if pid is None:
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def _spawn(command: list[str], run_dir: Path) -> int:
    env = dict(os.environ)
    # `-m trainers` must import this checkout whatever folder the UI was started from.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    log_path = Path(run_dir) / LOG_FILE
    with log_path.open("ab") as log:
        log.write(f"\n[ui {time.strftime('%Y-%m-%d %H:%M:%S')}] {' '.join(command)}\n".encode())
        log.flush()
        # A session of its own: Ctrl-C in the UI's terminal must not kill a run the UI does not own.
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    _children[child.pid] = child
    (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)  # a new trainer: its stop is not sent yet
    record = {"pid": child.pid, "command": command, "started": time.time()}
    atomic_write_text(Path(run_dir) / PID_FILE, json.dumps(record))
    return child.pid


# ---------------------------------------------------------------- status
def holds_run(run_dir: Path) -> bool:
    """Whether the trainer already started in this folder (it refuses to start a second run there)."""
    return (Path(run_dir) / EVENTS_FILE).exists() or bool(list_checkpoints(run_dir))


def free_run_name(runs_dir: Path, name: str) -> str:
    """`name` if its run folder holds no run, else the first free `name-2`, `name-3`, ... ("demo-2")."""
    base, number = name, 1
    stem, _, suffix = name.rpartition("-")
    if stem and suffix.isdigit() and int(suffix) >= 2:  # demo-2 taken: propose demo-3, not demo-2-2
        base, number = stem, int(suffix)
    candidate = name
    while holds_run(Path(runs_dir) / candidate):
        number += 1
        candidate = f"{base}-{number}"
    return candidate


def with_free_name(config: TrainConfig) -> tuple[TrainConfig, str]:
    """(config, "") when its run folder is free, else (the config renamed to a free name, a note saying so)."""
    name = free_run_name(Path(config.run_dir).parent, config.name)
    if name == config.name:
        return config, ""
    renamed = config.model_copy(update={"name": name})
    return renamed, f"`{config.name}` already holds a run, so this one is named **{name}**."


def read_pid(run_dir: Path) -> int | None:
    """The pid recorded in the run's trainer.pid, or None."""
    try:
        return int(json.loads((Path(run_dir) / PID_FILE).read_text(encoding="utf-8"))["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def trainer_pid(run_dir: Path) -> int | None:
    """The pid of the trainer running in `run_dir`, or None (a stale pid file is removed)."""
    pid = read_pid(run_dir)
    if pid is None:
        return None
    if is_trainer_alive(pid):
        return pid
    _reap(pid, Path(run_dir))
    (Path(run_dir) / PID_FILE).unlink(missing_ok=True)
    return None


def is_trainer_alive(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) trainer process."""
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True  # no /proc to look closer (macOS): trust the signal
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError):
        return False
    # A recycled pid belongs to some other program.
    return state != "Z" and b"trainers" in cmdline


def _reap(pid: int, run_dir: Path) -> None:
    child = _children.pop(pid, None)
    if child is None:
        return
    code = child.wait()
    with (run_dir / LOG_FILE).open("a", encoding="utf-8") as log:
        log.write(f"\n[ui {time.strftime('%Y-%m-%d %H:%M:%S')}] trainer exited with code {code}\n")


def wait_for_exit(run_dir: Path, timeout: float) -> bool:
    """Wait until no trainer runs in `run_dir`; False if one still does after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while trainer_pid(run_dir) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


# ---------------------------------------------------------------- runs folder
def list_run_dirs(runs_dir: Path) -> list[Path]:
    """Run folders under `runs_dir` (those with events, a config or a pid file), newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    markers = (EVENTS_FILE, "config.toml", PID_FILE, REQUEST_FILE)
    found = [p for p in root.iterdir() if p.is_dir() and any((p / m).exists() for m in markers)]
    return sorted(found, key=_last_activity, reverse=True)


def _last_activity(run_dir: Path) -> float:
    times = [
        (run_dir / name).stat().st_mtime
        for name in (EVENTS_FILE, LOG_FILE, PID_FILE)
        if (run_dir / name).exists()
    ]
    return max(times, default=run_dir.stat().st_mtime)


def running_runs(runs_dir: Path) -> list[Path]:
    """Run folders under `runs_dir` whose trainer is running now."""
    return [run_dir for run_dir in list_run_dirs(runs_dir) if trainer_pid(run_dir) is not None]


def one_at_a_time_refusal(runs_dir: Path, allow_parallel: bool, run_dir: Path | None = None) -> str | None:
    """Why a run may not start now (another one under `runs_dir` is training), or None if it may.

    `run_dir` is the run about to start or resume; it does not count against itself.
    """
    if allow_parallel:
        return None
    others = [r for r in running_runs(runs_dir) if run_dir is None or r.resolve() != Path(run_dir).resolve()]
    if not others:
        return None
    return (
        f"run {others[0].name} is still training, and this UI runs one at a time: stop it first "
        "(or start the UI with --allow-parallel-runs)"
    )


def log_tail(run_dir: Path, lines: int = 40, max_bytes: int = 200_000) -> str:
    """The last `lines` lines of train.log, progress-bar redraws (carriage returns) collapsed."""
    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return ""
    with path.open("rb") as file:
        file.seek(max(0, path.stat().st_size - max_bytes))
        text = file.read().decode("utf-8", errors="replace")
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.rstrip("\r\n").split("\n")]
    return "\n".join(shown[-lines:])
