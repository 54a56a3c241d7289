"""runs/<name>/events.jsonl: one JSON object per line, appended by the trainer, read by the UI and tests.

Event types: start, dataset, step, sample, checkpoint, freeze, warning, stopped, done, error.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"


class EventLog:
    """Appends events to a run's events.jsonl, flushing each line so readers see it at once."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, event_type: str, **fields: Any) -> dict[str, Any]:
        event = {"type": event_type, "time": round(time.time(), 3), **fields}
        self._file.write(json.dumps(event, default=_jsonable) + "\n")
        self._file.flush()
        return event

    def truncate_after(self, step: int) -> None:
        """Drop events logged after `step` (a resumed run repeats them)."""
        self._file.close()
        kept = [e for e in read_events(self.path.parent) if e.get("step", 0) <= step or e["type"] == "start"]
        self.path.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


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
