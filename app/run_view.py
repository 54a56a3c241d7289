"""What the Run and Runs tabs show about one run folder, read from its files each time.

Glue between the run folder (events, log, pid file) and the pure views in events_view; no Gradio here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from app import events_view as view
from app.runner import LOG_FILE, list_run_dirs, log_tail, trainer_pid
from trainers.events import EVENTS_FILE, read_events

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
    events: list[dict]
    log: str

    @property
    def title(self) -> str:
        """E.g. "**demo** — running"."""
        words = view.stopped_words(self.events) if self.state == "stopped" else STATE_WORDS.get(self.state)
        return f"**{self.run_dir.name}** — {words or self.state}  \n`{self.run_dir}`"

    def status_markdown(self) -> str:
        """State plus the run's errors and warnings in words."""
        notices = view.notices_markdown(self.events, self.state)
        if self.state == "not started" and self.log:
            notices = "The trainer exited before it started the run; the log below says why."
        return notices or "No warnings."


def snapshot(run_dir: Path, log_lines: int = 40) -> RunSnapshot:
    """Read a run folder's events, log tail and trainer state."""
    events = read_events(run_dir)
    alive = trainer_pid(run_dir) is not None
    return RunSnapshot(
        run_dir=Path(run_dir),
        state=view.run_state(events, alive),
        alive=alive,
        events=events,
        log=log_tail(run_dir, log_lines),
    )


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
        events = read_events(run_dir)
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
    """The run to show when nothing is chosen: a running one, else the newest."""
    runs = list_run_dirs(runs_dir)
    running = [r for r in runs if trainer_pid(r) is not None]
    return (running or runs or [None])[0]
