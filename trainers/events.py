"""runs/<name>/events.jsonl: one JSON object per line, appended by the trainer, read by the UI and tests.

Event types: start, dataset, step, sample, checkpoint, freeze, warning, validation, control, resumed,
stopped, done, error. Every event has `type` and `time` (Unix seconds); most have `step` (optimizer steps
done). Fields of the ones the insight features write (issue 11):

validation  the loss of the averaged weights x (what is exported) on the validation images, at fixed noise
            and fixed timesteps, so values compare step to step, run to run and across a resume. The `step`
            events' `loss` is the training loss at the training point y: name the curves accordingly.
    step        int    the step it was measured after
    loss        float  mean per-sample loss of the family's training objective (trainers/validation.py)
    best_step   int    the step with the lowest validation loss so far (what `export --best` picks)
    best_loss   float  that loss
    images      int    validation images; timesteps: int, fixed timesteps per image
    seconds     float  what the evaluation took
warning     something the user should know; printed once on the CLI. Optimizer-health codes
            (trainers/health.py): lr_not_one, d_stuck, d_growing_late, text_encoder_d_high, overfitting,
            nonfinite_gradients, weight_decay_lora (each at most once per run); and config,
            image_skipped, dataset, latents_not_cached, checkpoint_broken for the trainer's other warnings.
    code        str    one of the above
    message     str    the whole sentence to show, including what to do
    step        int    when it was found (health codes; the others may lack it: they come before step 1)
    ...                details per code: lr / text_encoder_lr (lr_not_one), group and d (d_stuck), group
                       and growth (d_growing_late), group and ratio (text_encoder_d_high), best_step
                       (overfitting), count and since_step (nonfinite_gradients), per_step (weight_decay_lora)
control     the trainer's answer to a request from `python -m trainers control RUN ACTION` or the UI
            (trainers/control.py: request_control), once per request, after acting on it
    action      str    freeze, sample, checkpoint or stop
    status      str    "done" or "refused"
    message     str    what happened, or why not (already frozen, no sampling prompts, sent before this
                       trainer started, the run ended first)
    request     str    the id request_control returned
    step        int    the step it was handled after (absent when refused as the run ended)
freeze      Prodigy's d stopped adapting
    step        int    the step it was logged after; since_step: int, the first step run with the frozen d
    d           list   d per optimizer group
    rule        str    "prodigy_steps", "auto" or "manual" (a `control` freeze)
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from trainers.atomic import atomic_write_text

EVENTS_FILE = "events.jsonl"


class EventLog:
    """Appends events to a run's events.jsonl, flushing each line so readers see it at once."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._open()

    def _open(self):
        """Open for appending; a partial last line (a write cut short) is ended first, so the next
        event starts on a line of its own and readers skip only the fragment."""
        file = self.path.open("a", encoding="utf-8")
        if file.tell() > 0:
            with self.path.open("rb") as existing:
                existing.seek(-1, 2)
                if existing.read(1) != b"\n":
                    file.write("\n")
                    file.flush()
        return file

    def write(self, event_type: str, **fields: Any) -> dict[str, Any]:
        event = {"type": event_type, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(event, default=_jsonable) + "\n")
        self._file.flush()
        return event

    def truncate_after(self, step: int) -> None:
        """Drop events logged after `step` (a resumed run repeats them)."""
        self._file.close()
        kept = [
            line
            for line, event in _complete_lines(self.path)
            if event.get("step", 0) <= step or event["type"] == "start"
        ]
        # temp file and rename: a kill mid-rewrite leaves the old file, never a shorter one
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self._file = self._open()

    def close(self) -> None:
        self._file.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def _complete_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, event) of each line that parses; a fragment cut short by a kill or a full disk is skipped."""
    if not path.is_file():
        return []
    found = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and "type" in event:
            found.append((line, event))
    return found


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """All complete events of a run (a line being written right now is skipped)."""
    path = Path(run_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


class EventTail:
    """Reads a run's events.jsonl incrementally: each read() parses only the bytes appended since the last.

    Only complete lines count: a line still being written (no newline yet) is left for the next read. When
    the file was replaced or rewritten (the trainer rewrites it on resume, dropping events after the
    checkpoint), the next read starts over from the first byte and says so with `restarted`.
    """

    CHUNK_BYTES = 1 << 20
    CHECK_BYTES = 64  # the bytes before the offset, compared on each read to notice an in-place rewrite

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.offset = 0
        self._identity: tuple[int, int] | None = None
        self._before_offset = b""

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """(events completed since the last read, whether reading started over from the file's start)."""
        try:
            file = self.path.open("rb")
        except FileNotFoundError:
            restarted = self.offset > 0 or self._identity is not None
            self.offset, self._identity, self._before_offset = 0, None, b""
            return [], restarted
        with file:
            restarted = self._same_file(file) is False
            if restarted:
                self.offset, self._before_offset = 0, b""
            self._identity = _identity(file)
            return self._read_lines(file), restarted

    def _same_file(self, file) -> bool | None:
        """None before the first read; False when the file is another one or no longer has what was read."""
        if self._identity is None:
            return None
        if _identity(file) != self._identity or os.fstat(file.fileno()).st_size < self.offset:
            return False
        file.seek(self.offset - len(self._before_offset))
        return file.read(len(self._before_offset)) == self._before_offset

    def _read_lines(self, file) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        file.seek(self.offset)
        pending = b""
        while chunk := file.read(self.CHUNK_BYTES):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()  # no newline yet: maybe still being written
            for line in lines:
                self.offset += len(line) + 1
                events.extend(_parse_line(line))
            if lines:
                complete = b"\n".join(lines) + b"\n"
                self._before_offset = (self._before_offset + complete)[-self.CHECK_BYTES :]
        return events


def _identity(file) -> tuple[int, int]:
    stat = os.fstat(file.fileno())
    return stat.st_dev, stat.st_ino


def _parse_line(line: bytes) -> list[dict[str, Any]]:
    """The event on one line, or nothing for a broken line (as read_events skips it)."""
    try:
        event = json.loads(line)
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        return []
    return [event]
