"""What the Run and Runs tabs show about one run folder, read from its files.

Glue between the run folder (events, log, pid file) and the pure views in events_view; no Gradio here.
events.jsonl is read incrementally (only what was appended since the last refresh) into a RunHistory per
run folder, shared by every page that shows that run.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from app import events_view as view
from app.health_banner import is_banner_warning
from app.runner import LOG_FILE, list_run_dirs, log_tail, trainer_pid
from trainers.checkpoint import list_checkpoints
from trainers.events import EVENTS_FILE, EventTail

WATCHED_RUNS = 16  # run folders whose history is kept between refreshes (least recently shown go first)

STATE_WORDS = {
    "running": "running",
    "starting": "starting (loading the model and caching the dataset)",
    "done": "done",
    "stopped": "stopped",  # the title says what the events say (view.stopped_words)
    "crashed": "crashed",
    "interrupted": "interrupted",
    "not started": "not started",
}


@dataclass
class RunSnapshot:
    """Everything the Run tab shows for one run, read once."""

    run_dir: Path
    state: str
    alive: bool
    events: list[dict]  # every event but steps, and the newest steps (see RunHistory.events)
    log: str
    frames: list[pd.DataFrame]  # loss, d and d·lr plot tables, each series at most MAX_POINTS points

    @property
    def title(self) -> str:
        """E.g. "**demo** — running"."""
        words = view.stopped_words(self.events) if self.state == "stopped" else STATE_WORDS.get(self.state)
        return in_ui_words(f"**{self.run_dir.name}** — {words or self.state}  \n`{self.run_dir}`")

    def status_markdown(self) -> str:
        """State plus the run's errors and warnings in words."""
        notices = view.notices_markdown(self.events, self.state)
        if self.state == "not started" and self.log:
            notices = "The trainer exited before it started the run; the log below says why."
        if not notices and any(is_banner_warning(e) for e in self.events):
            return ""  # the d-health banner below says it
        return in_ui_words(notices) or "No warnings."


def snapshot(run_dir: Path, log_lines: int = 40) -> RunSnapshot:
    """Read a run folder's new events, log tail and trainer state."""
    events, frames = watch(run_dir).read()
    alive = trainer_pid(run_dir) is not None
    return RunSnapshot(
        run_dir=Path(run_dir),
        state=view.run_state(events, alive),
        alive=alive,
        events=events,
        log=in_ui_words(log_tail(run_dir, log_lines)),
        frames=frames,
    )


# The trainer's console says what a terminal user would press; in the UI the buttons do it.
UI_WORDS = (
    ("press Ctrl-C again to abort", "Kill now aborts without saving"),
    ("a second Ctrl-C", "Kill now"),
    ("Ctrl-C", "Stop"),
)


def in_ui_words(log: str) -> str:
    """The log tail with terminal key presses named as the UI's buttons."""
    for terminal, ui in UI_WORDS:
        log = log.replace(terminal, ui)
    return log


class RunWatch:
    """A run folder's events.jsonl read incrementally into a RunHistory.

    Each read parses only the lines appended since the last; a rewritten file (resume) starts it over.
    Pages refresh from several threads at once, so reading and building the plot tables hold a lock, and
    the tables are built once per change, whichever page asks first.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._tail = EventTail(self.run_dir)
        self._history = view.RunHistory()
        self._lock = threading.Lock()
        self._frames: tuple[int, list[pd.DataFrame]] | None = None  # (history version, tables)

    def read(self) -> tuple[list[dict], list[pd.DataFrame]]:
        """(the kept events, the loss, d and d·lr plot tables) with every event written so far."""
        with self._lock:
            events, restarted = self._tail.read()
            if restarted:
                self._history, self._frames = view.RunHistory(), None
            if not self._history.add(events):
                # A step repeated without the file being rewritten: count each step once, from the start.
                self._tail = EventTail(self.run_dir)
                self._history, self._frames = view.RunHistory.from_events(self._tail.read()[0]), None
            history = self._history
            if self._frames is None or self._frames[0] != history.version:
                self._frames = (
                    history.version,
                    [history.loss_frame(), history.d_frame(), history.lr_frame()],
                )
            return history.events, self._frames[1]


_watches: OrderedDict[Path, RunWatch] = OrderedDict()
_watches_lock = threading.Lock()


def watch(run_dir: Path) -> RunWatch:
    """The RunWatch of a run folder, one per folder for the whole server."""
    key = Path(run_dir).resolve()
    with _watches_lock:
        if key in _watches:
            _watches.move_to_end(key)
        else:
            _watches[key] = RunWatch(key)
            while len(_watches) > WATCHED_RUNS:
                _watches.popitem(last=False)
        return _watches[key]


def change_signature(run_dir: Path | None) -> str:
    """A string that changes when the run's files or trainer state change (to skip redrawing idle plots)."""
    if run_dir is None:
        return ""
    parts = [str(run_dir), str(trainer_pid(run_dir))]
    for name in (EVENTS_FILE, LOG_FILE):
        path = Path(run_dir) / name
        stat = path.stat() if path.exists() else None
        parts.append(f"{stat.st_size}:{stat.st_mtime_ns}" if stat else "-")
    return "|".join(parts)


def runs_table(runs_dir: Path) -> pd.DataFrame:
    """One row per run under `runs_dir`, newest first: name, state, steps, final d, loss, samples, files."""
    rows = []
    for run_dir in list_run_dirs(runs_dir):
        events, _ = watch(run_dir).read()
        state = view.run_state(events, trainer_pid(run_dir) is not None)
        summary = view.run_summary(events, state)
        total = summary["total_steps"]
        loss = summary["last_loss"]
        rows.append(
            {
                "run": run_dir.name,
                "state": state,
                "steps": f"{summary['step']}/{total}" if total else str(summary["step"]),
                "final d": view.format_d(summary["final_d"]),
                "last loss": f"{loss:.4f}" if isinstance(loss, int | float) else "",
                "samples": summary["samples"],
                "exported": ", ".join(Path(p).name for p in summary["exported"]),
            }
        )
    columns = ["run", "state", "steps", "final d", "last loss", "samples", "exported"]
    return pd.DataFrame(rows, columns=columns)


def resolve_run(runs_dir: Path, name: str | None) -> Path | None:
    """runs_dir/name if `name` is a run folder directly under runs_dir (no paths, no ..), else None."""
    if not name or Path(name).name != name or name in (".", ".."):
        return None
    run_dir = Path(runs_dir).resolve() / name
    return run_dir if run_dir in [p.resolve() for p in list_run_dirs(runs_dir)] else None


def default_run(runs_dir: Path) -> Path | None:
    """The run to show when nothing is chosen: a running one, else the newest that did not fail before its
    first checkpoint (None when every run did: a page must not open on a crash the user has moved past)."""
    runs = list_run_dirs(runs_dir)
    running = [r for r in runs if trainer_pid(r) is not None]
    usable = [r for r in runs if not failed_before_checkpoint(r)]
    return (running or usable or [None])[0]


def exportable_run(runs_dir: Path) -> Path | None:
    """The newest run with a checkpoint (what the Export page offers first), or None."""
    return next((r for r in list_run_dirs(runs_dir) if list_checkpoints(r)), None)


def failed_before_checkpoint(run_dir: Path) -> bool:
    """Whether the run ended (crashed, or exited before it started) without saving any checkpoint."""
    if trainer_pid(run_dir) is not None or list_checkpoints(run_dir):
        return False
    events, _ = watch(run_dir).read()
    return view.run_state(events, alive=False) in ("crashed", "not started")
