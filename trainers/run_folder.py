"""What a run folder holds, as the CLI tells it: whether a name is free, finished or resumable, the runs
that exist, and the closing lines that name the LoRA files and how to use them.

A run folder that never reached a checkpoint holds nothing a new run could continue, so `train` of the
same name starts over; what the earlier attempt wrote is moved aside into `attempt-<time>/` inside the
folder (one rename per entry, nothing deleted), and files the UI keeps there (its log, its pid) stay.
A trainer holds a lock on its folder while it works, so this never happens under a running one.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.config import TrainConfig
from trainers.control import ControlChannel, ControlError
from trainers.events import EVENTS_FILE, read_events

CONFIG_FILE = "config.toml"
CHECKPOINTS = "checkpoints"
# What a trainer writes into its run folder: moved aside together when a run without checkpoint restarts.
TRAINER_OUTPUTS = (
    EVENTS_FILE,
    CONFIG_FILE,
    "export_metadata.json",
    "samples",
    "lora",
    "tensorboard",
    CHECKPOINTS,
)
ATTEMPT_PREFIX = "attempt-"
DEFAULT_OUTPUT_DIR = TrainConfig.model_fields["output_dir"].default


class RunFolderError(ValueError):
    """A run folder cannot be used as asked; the message says what exists and what to do."""


# ---------------------------------------------------------------- what a folder holds
def holds_trainer_output(run_dir: Path) -> bool:
    """Whether a trainer already wrote into this folder (its events or its resolved config)."""
    return any((Path(run_dir) / name).exists() for name in (EVENTS_FILE, CONFIG_FILE))


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints this folder holds (intact ones; see trainers/checkpoint.py)."""
    from trainers.checkpoint import list_checkpoints

    return [step for step, _ in list_checkpoints(run_dir)]


def has_checkpoint_folders(run_dir: Path) -> bool:
    """Whether any step-N folder exists, intact or not (a damaged one may still be worth keeping)."""
    from trainers.checkpoint import step_folders

    return bool(step_folders(run_dir))


def finished_event(run_dir: Path) -> dict[str, Any] | None:
    """The run's `done` event when the run is finished: its last event is `done`, at the step of the
    newest checkpoint, and the files it exported are still there."""
    events = read_events(run_dir)
    if not events or events[-1]["type"] != "done":
        return None
    done = events[-1]
    steps = checkpoint_steps(run_dir)
    if not steps or steps[-1] != done.get("step"):
        return None
    if not all(Path(path).is_file() for path in done.get("exported", [])):
        return None
    return done


# ---------------------------------------------------------------- listing runs
def existing_runs(output_dir: Path) -> list[Path]:
    """Run folders under `output_dir` (those a trainer wrote into), sorted by name."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and holds_trainer_output(p))


def no_such_run(run_dir: Path) -> RunFolderError:
    """The refusal for a run folder that holds no run, listing the runs next to it."""
    run_dir = Path(run_dir)
    where = run_dir.parent
    runs = existing_runs(where)
    if not runs and existing_runs(Path(DEFAULT_OUTPUT_DIR)):  # `resume demo` meant runs/demo
        where, runs = Path(DEFAULT_OUTPUT_DIR), existing_runs(Path(DEFAULT_OUTPUT_DIR))
    if runs:
        listed = ", ".join(str(p) for p in runs)
        known = f"runs in {where}: {listed}"
    else:
        known = f"{where} holds no runs" if where.is_dir() else f"{where} does not exist"
    return RunFolderError(
        f"no such run: {run_dir} ({'not a folder' if not run_dir.is_dir() else 'no config.toml in it'}); "
        f"{known}. Start one with `python -m trainers train CONFIG`."
    )


def require_run(run_dir: Path) -> Path:
    """`run_dir` if a trainer wrote into it, else RunFolderError listing the runs that exist."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise no_such_run(run_dir)
    return run_dir


def missing_checkpoint(run_dir: Path, step: int) -> RunFolderError:
    """The refusal for `--checkpoint STEP` that is not there, listing the checkpoints that are."""
    steps = checkpoint_steps(run_dir)
    if steps:
        known = (
            f"checkpoints there: {', '.join(str(s) for s in steps)} (older ones are pruned: saving.keep_last)"
        )
    else:
        known = "it holds no checkpoint yet"
    return RunFolderError(f"--checkpoint {step}: {run_dir} has no checkpoint at step {step}; {known}")


def name_note(run_dir: Path) -> str | None:
    """What `train` would do with this config's run folder, when it is not simply free."""
    run_dir = Path(run_dir)
    if has_checkpoint_folders(run_dir):
        done = finished_event(run_dir)
        what = f"a finished run (step {done.get('step')})" if done else "a run with checkpoints"
        return (
            f"note: {run_dir} already holds {what}: `train` refuses this name; choose another "
            f"(--set name=...){'' if done else f' or continue it with `python -m trainers resume {run_dir}`'}"
        )
    if holds_trainer_output(run_dir):
        return f"note: {run_dir} holds an attempt without checkpoint: `train` starts over (its files are kept aside)"
    return None


# ---------------------------------------------------------------- one trainer per folder
@contextlib.contextmanager
def trainer_lock(run_dir: Path) -> Iterator[ControlChannel]:
    """Held while `train` or `resume` works in `run_dir`, so a second one there is refused instead of
    moving or rewriting the first one's files; the system releases it when the process ends, however.
    It is the lock `trainers control` and the UI read as "running", and it yields the run's control channel.
    """
    channel = ControlChannel(run_dir)
    try:
        channel.acquire()
    except ControlError:
        raise RunFolderError(
            f"a trainer is running in {run_dir} now; wait for it to end, or stop it (Ctrl-C in its "
            "terminal, Stop in the UI), then try again"
        ) from None
    try:
        yield channel
    finally:
        channel.release()


# ---------------------------------------------------------------- starting over
@dataclass(frozen=True)
class SetAside:
    folder: Path  # where the earlier attempt's files are now
    reason: str  # what the earlier attempt ended with


def set_aside_attempt(run_dir: Path) -> SetAside | None:
    """Move what a trainer wrote into `run_dir` without reaching a checkpoint into `run_dir/attempt-<time>/`
    (one rename per entry: an interrupted move leaves each file in one of the two places, and the next
    start moves the rest); None when there was nothing to move."""
    run_dir = Path(run_dir)
    present = [name for name in TRAINER_OUTPUTS if (run_dir / name).exists()]
    if not present:
        return None
    reason = _attempt_end(read_events(run_dir))
    target = run_dir / f"{ATTEMPT_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = target.with_name(f"{ATTEMPT_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{suffix}")
    target.mkdir()
    for name in present:
        os.replace(run_dir / name, target / name)
    return SetAside(target, reason)


def _attempt_end(events: list[dict[str, Any]]) -> str:
    for event in reversed(events):
        if event["type"] in ("error", "stopped"):
            return f"{event['type']}: {event.get('message', '')}".strip()
    return "it ended before its first checkpoint"


# ---------------------------------------------------------------- the closing lines
def outcome_lines(run_dir: Path) -> list[str]:
    """What the CLI prints last after train/resume: what happened and what to do next."""
    run_dir = Path(run_dir)
    events = read_events(run_dir)
    last = events[-1] if events else {}
    if last.get("type") == "done":
        return [f"finished: {run_dir} (step {last.get('step')})", *lora_usage_lines(last.get("exported", []))]
    if last.get("type") == "stopped":
        steps = checkpoint_steps(run_dir)
        saved = f"checkpoint at step {steps[-1]}" if steps else "no checkpoint yet"
        return [
            f"stopped: {run_dir} ({saved}); continue with `python -m trainers resume {run_dir}`",
            *ui_lines(),
        ]
    return [f"run folder: {run_dir}", *ui_lines()]


def failure_lines(run_dir: Path) -> list[str]:
    """What to do after a run failed with an error (its error event holds the message)."""
    run_dir = Path(run_dir)
    steps = checkpoint_steps(run_dir) if run_dir.is_dir() else []
    if steps:
        return [
            f"{run_dir}: the last checkpoint is step {steps[-1]}; fix the cause, then continue with "
            f"`python -m trainers resume {run_dir}`"
        ]
    return [
        f"{run_dir}: no checkpoint was saved, so nothing is lost: fix the config, then run `train` again (the "
        f"same name starts over) or `python -m trainers resume {run_dir} --config FILE`"
    ]


def lora_usage_lines(files: list[str] | list[Path]) -> list[str]:
    """The exported files, their format, and how each is used."""
    if not files:
        return []
    lines = ["LoRA files:"]
    for file in map(Path, files):
        if file.stem.endswith("-diffusers"):
            lines.append(f"  {file}  (diffusers format)")
        else:
            lines.append(f"  {file}  (kohya format)")
    kohya = [Path(f) for f in files if not Path(f).stem.endswith("-diffusers")]
    diffusers = [Path(f) for f in files if Path(f).stem.endswith("-diffusers")]
    if kohya:
        lines.append(
            f"  kohya: copy {kohya[0].name} into ComfyUI/models/loras (LoraLoader node) or "
            "A1111/Forge's models/Lora"
        )
    if diffusers:
        file = diffusers[0]
        lines.append(f'  diffusers: pipe.load_lora_weights("{file.parent}", weight_name="{file.name}")')
    return [*lines, *ui_lines()]


def ui_lines() -> list[str]:
    return ["open it in the UI: python launch.py (Runs tab; Export writes other checkpoints and formats)"]
