"""Pure views of a run's `validation` events: the validation curve beside the training loss, the best step.

The training loss is measured at the training point y, the validation loss at the averaged weights x (what
gets exported), on images the run does not train on; the plot names both as such. No Gradio here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from app.events_view import empty_frame

Event = dict[str, Any]

# Short enough for the plot legend (it cuts labels at about 25 characters); the title says what y and x are.
TRAINING_SERIES = "training loss at y"
VALIDATION_SERIES = "validation loss at x"
PLOT_TITLE = "Training loss at y (the training point) and validation loss at x (the exported weights)"
COLUMNS = ["step", "loss", "series"]


@dataclass(frozen=True)
class Best:
    """The step with the lowest validation loss."""

    step: int
    loss: float

    @property
    def label(self) -> str:
        """The legend name of the best-step rule, e.g. "best validation: step 40"."""
        return f"best validation: step {self.step}"


def validation_points(events: list[Event]) -> list[tuple[int, float]]:
    """(step, loss) of each evaluation in step order; a step evaluated again after a resume counts once
    (the newest), and a loss that is not a finite number is left out."""
    by_step: dict[int, float] = {}
    for event in events:
        if event.get("type") != "validation" or not isinstance(event.get("step"), int):
            continue
        loss = event.get("loss")
        if isinstance(loss, int | float) and math.isfinite(loss):
            by_step[event["step"]] = float(loss)
        else:
            by_step.pop(event["step"], None)
    return sorted(by_step.items())


def best_validation(events: list[Event]) -> Best | None:
    """The lowest validation loss and its step (the earliest on a tie), or None without validation."""
    points = validation_points(events)
    if not points:
        return None
    step, loss = min(points, key=lambda point: (point[1], point[0]))
    return Best(step, loss)


def validation_frame(events: list[Event], training: list[tuple[int, float]]) -> pd.DataFrame | None:
    """Columns step, loss, series: the training loss points given, the validation loss, and a vertical
    rule at the best step spanning the plotted values; None when the run has no validation yet."""
    points = validation_points(events)
    if not points:
        return None
    series: list[tuple[str, list[tuple[int, float]]]] = [
        (TRAINING_SERIES, training),
        (VALIDATION_SERIES, points),
    ]
    best = best_validation(events)
    values = [y for _, pts in series for _, y in pts if math.isfinite(y)]
    if best is not None and values:
        series.append((best.label, [(best.step, min(values)), (best.step, max(values))]))
    rows = [(x, y, name) for name, pts in series for x, y in pts]
    if not rows:
        return empty_frame(COLUMNS)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.astype({"step": "int64", "loss": "float64"})


def training_points(loss_frame: pd.DataFrame | None) -> list[tuple[int, float]]:
    """The smoothed training loss from a loss plot table (events_view.loss_frame or RunHistory's)."""
    if loss_frame is None or not len(loss_frame):
        return []
    smoothed = loss_frame[loss_frame["series"].astype(str).str.startswith("smoothed")]
    return [(int(x), float(y)) for x, y in zip(smoothed["step"], smoothed["loss"])]


def validation_caption(events: list[Event]) -> str:
    """One line under the validation plot: the best step, or how to get a validation curve."""
    best = best_validation(events)
    if best is None:
        return (
            "No validation yet. Set `dataset.validation` (a folder, or a fraction such as 0.1 to hold out) "
            "and `validation.every_n_steps` to see the loss of the exported weights on unseen images."
        )
    count = len(validation_points(events))
    return (
        f"Best validation loss **{best.loss:.5g}** at step **{best.step}** ({count} evaluation"
        f"{'s' if count != 1 else ''}). The training loss is smoothed (EMA) and measured at the training "
        "point y; the validation loss is measured at x, the weights Export writes."
    )
