"""Pure views of a run's events (trainers.events): plot tables, progress and ETA, notices, summary.

Nothing here touches processes or Gradio, so every view is unit-testable from a list of event dicts.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from statistics import fmean
from typing import Any

import pandas as pd

from app.health_banner import is_banner_warning

Event = dict[str, Any]

SMOOTHING = 0.9  # EMA weight of the smoothed loss, as TensorBoard's slider
ETA_WINDOW = 50  # recent steps whose mean duration predicts the rest
# Events that change what the run is doing; the last one decides its state.
LIFECYCLE = ("start", "resumed", "stopped", "done", "error")

LOSS_COLUMNS = ["step", "loss", "series"]
D_COLUMNS = ["step", "d", "series"]
LR_COLUMNS = ["step", "lr", "series"]
MAX_POINTS = 1000  # most points drawn per plotted series, however long the run
KEEP_LAST = 200  # the newest points of a series, drawn at full resolution


# ---------------------------------------------------------------- plot tables
# loss_frame, d_frame and lr_frame define the tables from a whole event list; the Run tab draws the same
# tables from a RunHistory (below), bounded in points and fed incrementally.
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

    def text(self, live: bool = True) -> str:
        """E.g. "step 120/300 (40%) · 0.21 s/step · ETA 38s"; without speed and ETA unless `live`."""
        if not self.total:
            return "waiting for the trainer to start"
        parts = [f"step {self.step}/{self.total} ({self.fraction:.0%})"]
        if not live:
            return parts[0]
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


def progress_html(value: Progress, live: bool = True) -> str:
    """A progress bar with its text, as HTML for gr.HTML; a run that is not `live` shows no speed or ETA."""
    percent = f"{value.fraction * 100:.1f}"
    return (
        '<div class="ppsf-progress">'
        f'<progress max="100" value="{percent}" style="width:100%;height:1.2em"></progress>'
        f'<div class="ppsf-progress-text">{value.text(live)}</div></div>'
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
        if is_banner_warning(event):  # the d-health banner shows these (app/health_banner.py)
            continue
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
    images: list[tuple[str, str]] = []
    for event in reversed(events):  # newest first, stopping at the limit: a long run has thousands
        if event.get("type") != "sample":
            continue
        prompts = event.get("prompts") or []
        paths = list(enumerate(event.get("paths") or []))
        for index, path in reversed(paths):
            prompt = prompts[index] if index < len(prompts) else ""
            if os.path.isfile(path):
                images.append((str(path), f"step {event.get('step')}: {prompt}"))
            if len(images) == limit:
                return images
    return images


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


# ---------------------------------------------------------------- long runs: bounded plots, running summaries
class Bucket:
    """Consecutive points of a series merged into one: how many, and where its lowest and highest were."""

    __slots__ = ("count", "high", "high_step", "low", "low_step")

    def __init__(self) -> None:
        self.count = 0
        self.low_step = self.high_step = -1
        self.low = math.inf
        self.high = -math.inf

    def add(self, step: int, value: float) -> None:
        self.count += 1
        if not math.isfinite(value):
            return  # a bucket draws its extremes; nan/inf have none (the recent points still show them)
        if value < self.low:
            self.low_step, self.low = step, value
        if value >= self.high:  # on a tie the low stays the first and the high becomes the last point
            self.high_step, self.high = step, value

    def merge(self, other: Bucket) -> None:
        self.count += other.count
        if other.low < self.low:
            self.low_step, self.low = other.low_step, other.low
        if other.high >= self.high:
            self.high_step, self.high = other.high_step, other.high

    def points(self) -> list[tuple[int, float]]:
        """Its lowest and highest point in step order (one point when they are the same)."""
        if self.low_step < 0:
            return []
        if self.low_step == self.high_step:
            return [(self.low_step, self.low)]
        return sorted([(self.low_step, self.low), (self.high_step, self.high)])


class MinMaxSeries:
    """A plotted series of (step, value) that stays under `max_points` points however long it grows.

    The newest `keep_last` points are kept as they are. Older ones go into buckets of `width` points, each
    drawn as its lowest and highest point, so a spike stays visible. When the buckets no longer fit, each
    pair of neighbours is merged and the width doubles: memory and drawing cost stay fixed, and adding a
    point costs O(1) on average. Up to about max_points points nothing is merged away (a bucket of one or
    two points draws all of them). Pinned steps (the freeze) keep their exact point.
    """

    def __init__(self, max_points: int = MAX_POINTS, keep_last: int = KEEP_LAST) -> None:
        self.keep_last = keep_last
        self.max_buckets = max(2, (max_points - keep_last - 2) // 2)  # 2 points each, + the open bucket
        self.width = 1
        self.buckets: list[Bucket] = []
        self.open = Bucket()
        self.recent: deque[tuple[int, float]] = deque()
        self.pins: set[int] = set()
        self.pinned: dict[int, float] = {}

    def __len__(self) -> int:
        return sum(b.count for b in self.buckets) + self.open.count + len(self.recent)

    def add(self, step: int, value: float) -> None:
        """Append the point of the next step (steps must increase)."""
        self.recent.append((step, value))
        if len(self.recent) > self.keep_last:
            self._retire(*self.recent.popleft())

    def pin(self, step: int) -> None:
        """Keep the exact point of `step` when it leaves the recent points (if it has not already)."""
        self.pins.add(step)

    def _retire(self, step: int, value: float) -> None:
        if step in self.pins:
            self.pinned[step] = value
        self.open.add(step, value)
        if self.open.count < self.width:
            return
        self.buckets.append(self.open)
        self.open = Bucket()
        if len(self.buckets) > self.max_buckets:
            merged = self.buckets[0::2]
            for left, right in zip(merged, self.buckets[1::2]):
                left.merge(right)
            self.buckets = merged
            self.width *= 2

    def points(self) -> list[tuple[int, float]]:
        """The points to draw, in step order."""
        older: dict[int, float] = {}
        for bucket in [*self.buckets, self.open]:
            older.update(bucket.points())
        older.update(self.pinned)
        return sorted(older.items()) + list(self.recent)


RECENT_STEP_EVENTS = ETA_WINDOW + 1  # what progress() and wall_seconds_per_step() read


class RunHistory:
    """What the Run tab draws and says about a run, kept up to date from its events one batch at a time.

    It holds running summaries, not the events: each plotted series is a bounded MinMaxSeries, and `events`
    is a short list in file order (every event that is not a step, which are few, plus the newest step
    events) that the view functions above read as they would read the whole file.
    """

    def __init__(
        self, smoothing: float = SMOOTHING, max_points: int = MAX_POINTS, keep_last: int = KEEP_LAST
    ) -> None:
        self.smoothing = smoothing
        self._new_series = lambda: MinMaxSeries(max_points, keep_last)
        self.raw = self._new_series()
        self.smoothed = self._new_series()
        self._ema = (0.0, 0.0)  # (average, weight) of the debiased EMA, see ema()
        self._last_smoothed: float | None = None
        self.groups: dict[str, dict[str, MinMaxSeries]] = {"d": {}, "lr": {}}  # key -> group name -> series
        self.extremes: dict[str, tuple[float, float]] = {
            "d": (math.inf, -math.inf),
            "lr": (math.inf, -math.inf),
        }
        self.freeze: int | None = None
        self.last_step: int | None = None
        self.version = 0  # grows with every change, so a caller can tell whether anything is new
        self._seq = 0
        self._others: list[tuple[int, Event]] = []
        self._recent_steps: deque[tuple[int, Event]] = deque(maxlen=RECENT_STEP_EVENTS)

    @classmethod
    def from_events(cls, events: list[Event], **kwargs: Any) -> RunHistory:
        """The history of a whole event list, each step counted once (as step_events does)."""
        history = cls(**kwargs)
        history._set_freeze(freeze_step(events))
        steps = step_events(events)
        for event in steps:
            history._plot_step(event)
        kept = {id(event) for event in steps}
        for event in events:
            if _is_step(event):
                if id(event) in kept:
                    history._recent_steps.append((history._next_seq(), event))
            else:
                history._keep_other(event)
        history.version += 1
        return history

    def add(self, events: Iterable[Event]) -> bool:
        """Take the events that follow those already added. False (and nothing changed past that event) when
        a step number goes back: that history cannot be undone piecemeal, rebuild it with from_events."""
        for event in events:
            if _is_step(event):
                if self.last_step is not None and event["step"] <= self.last_step:
                    return False
                self._plot_step(event)
                self._recent_steps.append((self._next_seq(), event))
            else:
                self._keep_other(event)
                if event.get("type") == "freeze" and self.freeze is None:
                    self._set_freeze(freeze_step([event]))
            self.version += 1
        return True

    @property
    def events(self) -> list[Event]:
        """The kept events in file order: every non-step event and the newest step events."""
        merged = sorted([*self._others, *self._recent_steps], key=lambda item: item[0])
        return [event for _, event in merged]

    # ------------------------------------------------------------ plot tables (as loss_frame, d_frame, lr_frame)
    def loss_frame(self) -> pd.DataFrame:
        """Columns step, loss, series: "raw" and "smoothed (EMA …)", at most MAX_POINTS rows each."""
        label = f"smoothed (EMA {self.smoothing:g})"
        return _long_frame(LOSS_COLUMNS, [("raw", self.raw.points()), (label, self.smoothed.points())])

    def d_frame(self) -> pd.DataFrame:
        """Prodigy's d per group, and the freeze rule (see group_frame)."""
        return self._group_frame("d")

    def lr_frame(self) -> pd.DataFrame:
        """The applied learning rate d·lr per group, and the freeze rule (see group_frame)."""
        return self._group_frame("lr")

    def _group_frame(self, key: str) -> pd.DataFrame:
        series = [(name, values.points()) for name, values in self.groups[key].items()]
        low, high = self.extremes[key]
        if self.freeze is not None and low <= high:
            series.append((f"d frozen at step {self.freeze}", [(self.freeze, low), (self.freeze, high)]))
        return _long_frame(["step", key, "series"], series)

    # ------------------------------------------------------------ intake
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _keep_other(self, event: Event) -> None:
        self._others.append((self._next_seq(), event))

    def _set_freeze(self, step: int | None) -> None:
        self.freeze = step
        if step is None:
            return
        for series in [self.raw, self.smoothed, *self.groups["d"].values(), *self.groups["lr"].values()]:
            series.pin(step)

    def _plot_step(self, event: Event) -> None:
        step = event["step"]
        self.last_step = step
        loss = event.get("loss")
        if isinstance(loss, int | float):
            self.raw.add(step, float(loss))
            self.smoothed.add(step, self._smooth(float(loss)))
        for group in event.get("groups") or []:
            for key in ("d", "lr"):
                value = group.get(key)
                if isinstance(value, int | float) and math.isfinite(value):
                    self._group_series(key, str(group.get("name", "group"))).add(step, float(value))
                    low, high = self.extremes[key]
                    self.extremes[key] = (min(low, value), max(high, value))

    def _smooth(self, value: float) -> float:
        """The next value of ema(): the same debiased average, one value at a time."""
        if not math.isfinite(value):
            smoothed = value if self._last_smoothed is None else self._last_smoothed
        else:
            average, weight = self._ema
            average = self.smoothing * average + (1 - self.smoothing) * value
            weight = self.smoothing * weight + (1 - self.smoothing)
            self._ema = (average, weight)
            smoothed = average / weight
        self._last_smoothed = smoothed
        return smoothed

    def _group_series(self, key: str, name: str) -> MinMaxSeries:
        if name not in self.groups[key]:
            series = self.groups[key][name] = self._new_series()
            if self.freeze is not None:
                series.pin(self.freeze)
        return self.groups[key][name]


def _is_step(event: Event) -> bool:
    return event.get("type") == "step" and isinstance(event.get("step"), int)


def _long_frame(columns: list[str], series: list[tuple[str, list[tuple[int, float]]]]) -> pd.DataFrame:
    """A long-format plot table from (series name, points) pairs; numeric columns even when empty."""
    step, value, name = columns
    if not any(points for _, points in series):
        return empty_frame(columns)
    return pd.DataFrame(
        {
            step: pd.Series([x for _, points in series for x, _ in points], dtype="int64"),
            value: pd.Series([y for _, points in series for _, y in points], dtype="float64"),
            name: [label for label, points in series for _ in points],
        }
    )
