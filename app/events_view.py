"""Pure views of a run's events (trainers.events): plot tables, progress and ETA, notices, summary.

Nothing here touches processes or Gradio, so every view is unit-testable from a list of event dicts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from statistics import fmean
from typing import Any

import pandas as pd

Event = dict[str, Any]

SMOOTHING = 0.9  # EMA weight of the smoothed loss, as TensorBoard's slider
ETA_WINDOW = 50  # recent steps whose mean duration predicts the rest
# Events that change what the run is doing; the last one decides its state.
LIFECYCLE = ("start", "resumed", "stopped", "done", "error")

LOSS_COLUMNS = ["step", "loss", "series"]
D_COLUMNS = ["step", "d", "series"]
LR_COLUMNS = ["step", "lr", "series"]


# ---------------------------------------------------------------- plot tables
def empty_frame(columns: list[str]) -> pd.DataFrame:
    """An empty plot table with numeric x/y columns: the browser fixes an axis's scale type on first sight."""
    step, value, series = columns
    return pd.DataFrame(
        {step: pd.Series(dtype="int64"), value: pd.Series(dtype="float64"), series: pd.Series(dtype="str")}
    )


def step_events(events: list[Event]) -> list[Event]:
    """The step events in step order, one per step (a resumed run's repeat of a step replaces it)."""
    by_step: dict[int, Event] = {}
    for event in events:
        if event.get("type") == "step" and isinstance(event.get("step"), int):
            by_step[event["step"]] = event
    return [by_step[step] for step in sorted(by_step)]


def ema(values: list[float], smoothing: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average: the first values are not dragged towards 0."""
    smoothed, average, weight = [], 0.0, 0.0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(smoothed[-1] if smoothed else value)
            continue
        average = smoothing * average + (1 - smoothing) * value
        weight = smoothing * weight + (1 - smoothing)
        smoothed.append(average / weight)
    return smoothed


def loss_frame(events: list[Event], smoothing: float = SMOOTHING) -> pd.DataFrame:
    """Columns step, loss, series: series "raw" and "smoothed" (EMA), long format for gr.LinePlot."""
    steps = [e for e in step_events(events) if isinstance(e.get("loss"), int | float)]
    if not steps:
        return empty_frame(LOSS_COLUMNS)
    xs = [e["step"] for e in steps]
    raw = [float(e["loss"]) for e in steps]
    rows = [(x, y, "raw") for x, y in zip(xs, raw)]
    rows += [(x, y, f"smoothed (EMA {smoothing:g})") for x, y in zip(xs, ema(raw, smoothing))]
    return pd.DataFrame(rows, columns=LOSS_COLUMNS)


def freeze_step(events: list[Event]) -> int | None:
    """The step from which Prodigy's d stayed fixed, or None if it never froze."""
    for event in events:
        if event.get("type") == "freeze":
            since = event.get("since_step")
            return int(since) if isinstance(since, int | float) and since > 0 else int(event.get("step", 0))
    return None


def group_frame(events: list[Event], key: str) -> pd.DataFrame:
    """Columns step, <key>, series: one series per parameter group, plus the freeze rule if d froze.

    `key` is "d" (Prodigy's estimate) or "lr" (the applied learning rate d·lr). The freeze is drawn as a
    vertical two-point series "d frozen at step N" spanning the plotted values, since gr.LinePlot has no rules.
    """
    rows = []
    for event in step_events(events):
        for group in event.get("groups") or []:
            value = group.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                rows.append((event["step"], float(value), str(group.get("name", "group"))))
    frame = (
        pd.DataFrame(rows, columns=["step", key, "series"]) if rows else empty_frame(["step", key, "series"])
    )
    frozen = freeze_step(events)
    if frozen is not None and rows:
        low, high = frame[key].min(), frame[key].max()
        marker = f"d frozen at step {frozen}"
        rule = pd.DataFrame([(frozen, low, marker), (frozen, high, marker)], columns=["step", key, "series"])
        frame = pd.concat([frame, rule], ignore_index=True)
    return frame


def d_frame(events: list[Event]) -> pd.DataFrame:
    """Prodigy's d per parameter group (see group_frame)."""
    return group_frame(events, "d")


def lr_frame(events: list[Event]) -> pd.DataFrame:
    """The applied learning rate d·lr per parameter group (see group_frame)."""
    return group_frame(events, "lr")


# ---------------------------------------------------------------- progress
@dataclass(frozen=True)
class Progress:
    """Where a run stands: steps done of total, and the predicted seconds left (None when unknown)."""

    step: int
    total: int | None
    eta_seconds: float | None
    seconds_per_step: float | None

    @property
    def fraction(self) -> float:
        """Share of the run done, 0..1 (0 while the total is unknown)."""
        return min(1.0, self.step / self.total) if self.total else 0.0

    def text(self) -> str:
        """E.g. "step 120/300 (40%) · 0.21 s/step · ETA 38s"."""
        if not self.total:
            return "waiting for the trainer to start"
        parts = [f"step {self.step}/{self.total} ({self.fraction:.0%})"]
        if self.seconds_per_step:
            parts.append(f"{self.seconds_per_step:.2f} s/step")
        if self.eta_seconds is not None and self.step < self.total:
            parts.append(f"ETA {format_duration(self.eta_seconds)}")
        return " · ".join(parts)


def total_steps(events: list[Event]) -> int | None:
    """total_steps of the newest start event (a resumed run logs a new one)."""
    for event in reversed(events):
        if event.get("type") == "start" and isinstance(event.get("total_steps"), int):
            return event["total_steps"]
    return None


def progress(events: list[Event], window: int = ETA_WINDOW) -> Progress:
    """Steps done, total, and ETA = steps left × seconds per step over the last `window` steps.

    Seconds per step is the wall-clock time between step events since the trainer last started (so
    sampling and checkpoint pauses count), else the mean of the events' step_seconds.
    """
    steps = step_events(events)
    done = steps[-1]["step"] if steps else 0
    total = total_steps(events)
    per_step = wall_seconds_per_step(events, window)
    if per_step is None:
        durations = [
            e["step_seconds"] for e in steps[-window:] if isinstance(e.get("step_seconds"), int | float)
        ]
        per_step = fmean(durations) if durations else None
    eta = (total - done) * per_step if total is not None and per_step is not None else None
    return Progress(step=done, total=total, eta_seconds=eta, seconds_per_step=per_step)


def wall_seconds_per_step(events: list[Event], window: int = ETA_WINDOW) -> float | None:
    """Wall-clock seconds per step over the last `window` steps of the current trainer process, or None.

    Only steps after the newest start event count: a stop and resume must not look like one slow step.
    """
    since = max((i for i, e in enumerate(events) if e.get("type") == "start"), default=0)
    timed = [e for e in events[since:] if e.get("type") == "step" and isinstance(e.get("time"), int | float)]
    timed = timed[-(window + 1) :]
    if len(timed) < 2 or timed[-1]["step"] <= timed[0]["step"]:
        return None
    return (timed[-1]["time"] - timed[0]["time"]) / (timed[-1]["step"] - timed[0]["step"])


def format_duration(seconds: float) -> str:
    """Seconds as "45s", "3m 05s" or "2h 07m"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def progress_html(value: Progress) -> str:
    """A progress bar with its text, as HTML for gr.HTML."""
    percent = f"{value.fraction * 100:.1f}"
    return (
        '<div class="ppsf-progress">'
        f'<progress max="100" value="{percent}" style="width:100%;height:1.2em"></progress>'
        f'<div class="ppsf-progress-text">{value.text()}</div></div>'
    )


# ---------------------------------------------------------------- state and notices
def lifecycle_event(events: list[Event]) -> Event | None:
    """The newest start/resumed/stopped/done/error event, or None."""
    for event in reversed(events):
        if event.get("type") in LIFECYCLE:
            return event
    return None


def run_state(events: list[Event], alive: bool) -> str:
    """One of: running, starting, done, stopped, crashed, interrupted, not started.

    `alive` says whether the trainer process is running. "interrupted" means it ended without saying how
    (killed, or the machine went down): the newest checkpoint is still there to resume from.
    """
    last = lifecycle_event(events)
    if alive:
        return "running" if last is not None and last["type"] in ("start", "resumed") else "starting"
    if last is None:
        return "not started"
    return {"done": "done", "stopped": "stopped", "error": "crashed"}.get(last["type"], "interrupted")


def stopped_words(events: list[Event]) -> str:
    """How a stopped run's title says it stopped: a checkpoint is named only when a checkpoint event of
    the trainer's last session is at or after the stop's step."""
    last = lifecycle_event(events)
    if last is None or last.get("type") != "stopped":
        return "stopped"
    stop_step = last.get("step")
    session = events[: len(events) - events[::-1].index(last)]
    for event in reversed(session if isinstance(stop_step, int) else []):
        if event.get("type") in ("start", "resumed"):
            break
        step = event.get("step")
        if event.get("type") == "checkpoint" and isinstance(step, int) and step >= stop_step:
            return f"stopped (checkpoint saved at step {step})"
    return f"stopped (no checkpoint saved: {last.get('message') or 'no reason given'})"


def notices_markdown(events: list[Event], state: str) -> str:
    """The run's errors and warnings in words, as Markdown ("" when there is nothing to say)."""
    lines = []
    last = lifecycle_event(events)
    if state == "crashed" and last is not None:
        lines.append(f"**Training failed:** {last.get('message', 'unknown error')}")
        lines.append(resume_hint(last.get("last_checkpoint"), last.get("last_checkpoint_step")))
    elif state == "interrupted":
        checkpoint = last_checkpoint_event(events)
        lines.append(
            "**The trainer ended without a final message** (killed, or out of memory?); see the log."
        )
        lines.append(
            resume_hint(checkpoint and checkpoint.get("path"), checkpoint and checkpoint.get("step"))
        )
    elif state == "done" and last is not None:
        files = ", ".join(f"`{path}`" for path in last.get("exported") or []) or "none"
        lines.append(f"**Finished** at step {last.get('step', '?')}. Exported: {files}")
    elif state == "stopped" and last is not None:
        lines.append(f"Stopped at step {last.get('step', '?')}: {last.get('message', '')}. Resume continues.")
    seen = set()
    for event in events:
        if event.get("type") == "warning" and event.get("message") not in seen:
            seen.add(event.get("message"))
            lines.append(f"- warning: {event.get('message')}")
    dataset = dataset_event(events)
    if dataset and dataset.get("missing_captions"):
        lines.append(
            f"- {dataset['missing_captions']} images have no caption (trained on the trigger word only)"
        )
    return "\n\n".join(line for line in lines if line)


def resume_hint(path: str | None, step: int | None) -> str:
    """What Resume will continue from, in words."""
    if not path:
        return "No checkpoint was saved yet, so Resume starts the run over."
    return f"Last checkpoint: step {step} (`{path}`). Press Resume to continue from it."


def last_checkpoint_event(events: list[Event]) -> Event | None:
    """The newest checkpoint event, or None."""
    return next((e for e in reversed(events) if e.get("type") == "checkpoint"), None)


def dataset_event(events: list[Event]) -> Event | None:
    """The newest dataset event, or None."""
    return next((e for e in reversed(events) if e.get("type") == "dataset"), None)


# ---------------------------------------------------------------- samples and summary
def sample_images(events: list[Event], limit: int = 48) -> list[tuple[str, str]]:
    """(path, "step N: prompt") of sample images that exist, newest first, at most `limit`."""
    images = []
    for event in events:
        if event.get("type") != "sample":
            continue
        prompts = event.get("prompts") or []
        for index, path in enumerate(event.get("paths") or []):
            prompt = prompts[index] if index < len(prompts) else ""
            images.append((str(path), f"step {event.get('step')}: {prompt}"))
    images = [item for item in images if os.path.isfile(item[0])]
    return images[::-1][:limit]


def final_d(events: list[Event]) -> list[float] | None:
    """d per group at the end (done event), else at the newest step; None before the first step."""
    for event in reversed(events):
        if event.get("type") == "done" and event.get("final_d"):
            return [float(d) for d in event["final_d"]]
    steps = step_events(events)
    if steps and steps[-1].get("groups"):
        return [float(g["d"]) for g in steps[-1]["groups"] if isinstance(g.get("d"), int | float)]
    return None


def run_summary(events: list[Event], state: str) -> dict[str, Any]:
    """Steps, total, state, final d, last loss, samples and exported files of a run, for tables."""
    now = progress(events)
    steps = step_events(events)
    done = next((e for e in reversed(events) if e.get("type") == "done"), None)
    started = next((e.get("time") for e in events if e.get("type") == "start"), None)
    return {
        "state": state,
        "step": now.step,
        "total_steps": now.total,
        "final_d": final_d(events),
        "last_loss": steps[-1].get("loss") if steps else None,
        "samples": sum(len(e.get("paths") or []) for e in events if e.get("type") == "sample"),
        "exported": list(done.get("exported") or []) if done else [],
        "started": started,
    }


def format_d(values: list[float] | None) -> str:
    """d values as "3.18e-02" (groups separated by commas), "" when unknown."""
    return ", ".join(f"{value:.3g}" for value in values) if values else ""
