"""runs/<name>/events.jsonl: one JSON object per line, appended by the trainer, read by the UI and tests.

Event types: start, dataset, step, sample, checkpoint, freeze, warning, stopped, done, error.
"""

from __future__ import annotations

import json
import math
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
