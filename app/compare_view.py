"""Compare runs: their loss, validation and d curves overlaid by step, the config values that differ, and
each run's final d and best validation loss. This is how a user learns what d_coef, rank or a dataset
change did.

Reads run folders (events.jsonl, config.toml) and returns plain tables; no Gradio here.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from app import events_view as view
from app.validation_view import Best, best_validation, validation_points
from trainers.events import read_events

LOSS_COLUMNS = ["step", "training loss", "run"]
VALIDATION_COLUMNS = ["step", "validation loss", "run"]
D_COLUMNS = ["step", "log10 d", "series"]  # gr.LinePlot has no log axis: d spans decades, so plot log10 d
SKIPPED_SETTINGS = ("name",)  # differs between any two runs and is already each column's title
MISSING = "—"


@dataclass
class RunCurves:
    """What the comparison reads from one run folder."""

    name: str
    loss: list[tuple[int, float]]  # smoothed training loss (EMA), at most MAX_POINTS points
    validation: list[tuple[int, float]]
    d: dict[str, list[tuple[int, float]]]  # group name -> Prodigy's d per step
    final_d: dict[str, float]
    best: Best | None
    steps: int
    total_steps: int | None
    settings: dict[str, Any] = field(default_factory=dict)  # config.toml flattened to dotted keys


class CompareError(ValueError):
    """A comparison that cannot be made; the message says what to choose instead."""


# ---------------------------------------------------------------- reading
def load_run(run_dir: Path) -> RunCurves:
    """The curves, final d, best validation and config of one run folder."""
    run_dir = Path(run_dir)
    events = read_events(run_dir)
    steps = view.step_events(events)
    loss = _bounded(
        [(e["step"], float(e["loss"])) for e in steps if isinstance(e.get("loss"), int | float)], smooth=True
    )
    d: dict[str, list[tuple[int, float]]] = {}
    for event in steps:
        for group in event.get("groups") or []:
            value = group.get("d")
            if isinstance(value, int | float) and math.isfinite(value) and value > 0:
                d.setdefault(str(group.get("name", "group")), []).append((event["step"], float(value)))
    final = {name: points[-1][1] for name, points in d.items()}
    done = next((e for e in reversed(events) if e.get("type") == "done" and e.get("final_d")), None)
    if done is not None and len(done["final_d"]) == len(final):
        final = {name: float(value) for name, value in zip(final, done["final_d"])}
    return RunCurves(
        name=run_dir.name,
        loss=loss,
        validation=validation_points(events),
        d={name: _bounded(points) for name, points in d.items()},
        final_d=final,
        best=best_validation(events),
        steps=steps[-1]["step"] if steps else 0,
        total_steps=view.total_steps(events),
        settings=read_settings(run_dir / "config.toml"),
    )


def load_runs(run_dirs: list[Path]) -> list[RunCurves]:
    """The runs to compare; CompareError unless there are at least two distinct ones."""
    unique = list(dict.fromkeys(Path(p) for p in run_dirs))
    if len(unique) < 2:
        raise CompareError("choose two or more runs to compare")
    return [load_run(run_dir) for run_dir in unique]


def read_settings(path: Path) -> dict[str, Any]:
    """config.toml as {dotted key: value} ({} when the run has none yet or it does not parse)."""
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}
    return flatten(document)


def flatten(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and other values are kept as they are."""
    flat: dict[str, Any] = {}
    for key, value in document.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _bounded(points: list[tuple[int, float]], smooth: bool = False) -> list[tuple[int, float]]:
    """At most MAX_POINTS points of a series (spikes kept, as the Run tab draws it); EMA-smoothed if asked."""
    values = view.ema([y for _, y in points]) if smooth else [y for _, y in points]
    series = view.MinMaxSeries()
    for (step, _), value in zip(points, values):
        series.add(step, value)
    return series.points()


# ---------------------------------------------------------------- tables
def _long(columns: list[str], series: list[tuple[str, list[tuple[int, float]]]]) -> pd.DataFrame | None:
    """A long-format plot table, or None when no series has a point (an empty plot would fix its legend)."""
    rows = [(x, y, name) for name, points in series for x, y in points]
    if not rows:
        return None
    return pd.DataFrame(rows, columns=columns).astype({columns[0]: "int64", columns[1]: "float64"})


def loss_overlay(runs: list[RunCurves]) -> pd.DataFrame | None:
    """Columns step, training loss, run: each run's smoothed training loss."""
    return _long(LOSS_COLUMNS, [(run.name, run.loss) for run in runs])


def validation_overlay(runs: list[RunCurves]) -> pd.DataFrame | None:
    """Columns step, validation loss, run: each run's validation loss at x (None if no run validated)."""
    return _long(VALIDATION_COLUMNS, [(run.name, run.validation) for run in runs])


def d_overlay(runs: list[RunCurves]) -> pd.DataFrame | None:
    """Columns step, log10 d, series ("run · group"): Prodigy's d of every group of every run."""
    series = [
        (f"{run.name} · {group}", [(x, math.log10(y)) for x, y in points])
        for run in runs
        for group, points in run.d.items()
    ]
    return _long(D_COLUMNS, series)


def config_differences(runs: list[RunCurves]) -> pd.DataFrame:
    """Columns setting, <run>...: one row per config value that is not the same in every run."""
    keys = sorted({key for run in runs for key in run.settings} - set(SKIPPED_SETTINGS))
    rows = []
    for key in keys:
        values = [run.settings.get(key, MISSING) for run in runs]
        if any(value != values[0] for value in values[1:]):
            rows.append([key, *(_format_setting(value) for value in values)])
    return pd.DataFrame(rows, columns=["setting", *_column_names(runs)])


def summary_table(runs: list[RunCurves]) -> pd.DataFrame:
    """One row per run: steps, final d per group, best validation loss and its step."""
    rows = []
    for run in runs:
        rows.append(
            {
                "run": run.name,
                "steps": f"{run.steps}/{run.total_steps}" if run.total_steps else str(run.steps),
                "final d": ", ".join(f"{name} {value:.3g}" for name, value in run.final_d.items()) or MISSING,
                "best validation loss": f"{run.best.loss:.5g}" if run.best else MISSING,
                "at step": str(run.best.step) if run.best else MISSING,
                "last training loss (EMA)": f"{run.loss[-1][1]:.4g}" if run.loss else MISSING,
            }
        )
    columns = ["run", "steps", "final d", "best validation loss", "at step", "last training loss (EMA)"]
    return pd.DataFrame(rows, columns=columns)


def differences_caption(runs: list[RunCurves], differences: pd.DataFrame) -> str:
    """One line above the table of differing settings."""
    if not any(run.settings for run in runs):
        return "None of these runs has a config.toml yet."
    if not len(differences):
        return "The runs' configs are the same (apart from their names)."
    return f"{len(differences)} setting(s) differ:"


def _column_names(runs: list[RunCurves]) -> list[str]:
    return [run.name for run in runs]


def _format_setting(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # as TOML writes it
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)
