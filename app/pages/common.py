"""What several pages share: the UI's settings, the problem marks of the Setup form, the run plots and the
sample gallery (drawn alike on the Run and Runs pages), the list of run names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd

from app import config_form as form
from app import runner

MEMORY_PENDING = "**Memory estimate:** measured from the model's architecture once the form is filled in."
PLOT_TITLES = ("Loss", "Prodigy's d per group", "Applied learning rate d·lr per group")


@dataclass
class UiContext:
    """Settings the handlers share (never run state)."""

    runs_dir: Path
    presets_dir: Path
    allow_parallel_runs: bool
    configs_dir: Path  # the only folder "Save to file" writes to and, with presets_dir, "Load file" reads
    datasets_dir: Path | None = None  # where uploaded datasets go; None: datasets/ beside the runs folder
    gpus_present: int = 0  # CUDA devices here; with two or more, Setup offers how many a run uses
    specs: list[form.FieldSpec] = field(default_factory=form.form_fields)


def marks(ctx: UiContext, problems: list[str]) -> list[Any]:
    """Updates for the Setup form's overall problem list, each section's problem list and each accordion."""
    grouped = form.problems_by_section(problems)
    overall = ""
    if problems:
        overall = f"**{len(problems)} problem(s):**\n" + "\n".join(f"- {p}" for p in problems)
    sections = [
        gr.Markdown(value="\n".join(f"- ⚠ {p}" for p in grouped[key]), visible=bool(grouped[key]))
        for key, _ in form.SECTIONS
    ]
    accordions = [gr.Accordion(open=True) if grouped[key] else gr.skip() for key, _ in form.SECTIONS]
    return [overall, *sections, *accordions]


LOG_D = "log10 d"  # d and d·lr are drawn on a log axis: they grow by decades early on
LOG_LR = "log10 d·lr"
ONE_PLOT_TITLE = "Prodigy's d per group = the applied learning rate (lr = 1)"
MIN_X_SPAN = 10  # steps the x axis spans at least, so its ticks are whole steps early in a run
X_SPANS = (MIN_X_SPAN, 4 * MIN_X_SPAN)  # fixed axes while a run is short: past 40 steps the free one is whole


def run_plots(prefix: str) -> list[gr.LinePlot]:
    """The loss, d and d·lr plots of a run (elem ids `{prefix}plot-loss`, `-d`, `-lr`); fill them with
    plot_updates()."""
    common = {"x": "step", "color": "series", "height": 280, "x_lim": [0, MIN_X_SPAN]}
    with gr.Row():
        loss = gr.LinePlot(None, y="loss", title=PLOT_TITLES[0], elem_id=f"{prefix}plot-loss", **common)
        d = gr.LinePlot(
            None, y=LOG_D, y_title="d (log10: -4 is 1e-4)", title=ONE_PLOT_TITLE,
            elem_id=f"{prefix}plot-d", **common,
        )  # fmt: skip
        lr = gr.LinePlot(
            None, y=LOG_LR, y_title="d·lr (log10: -4 is 1e-4)", title=PLOT_TITLES[2],
            elem_id=f"{prefix}plot-lr", visible=False, **common,
        )  # fmt: skip
    return [loss, d, lr]


def plot_frames(frames: list[pd.DataFrame]) -> list[pd.DataFrame | None]:
    """The snapshot's loss, d and d·lr tables, d and d·lr with their log10 column; None for an empty one
    (an empty table would fix an empty legend)."""
    loss, d, lr = frames
    d, lr = _with_log(d, "d", LOG_D), _with_log(lr, "lr", LOG_LR)
    return [frame if frame is not None and len(frame) else None for frame in (loss, d, lr)]


def plot_updates(frames: list[pd.DataFrame | None]) -> list[gr.LinePlot]:
    """Updates of the three plots from plot_frames(): whole steps on x; d·lr shown only where it is not d
    (with lr = 1 in every group the two plots would be the same, so d's plot says so and stands alone)."""
    loss, d, lr = frames
    last = max((int(frame["step"].max()) for frame in frames if frame is not None), default=0)
    # Early on the axis is held at 0..10, then 0..40 (a free axis over a few steps has ticks 0.5 apart); later
    # it is left free. A limit that changed at every refresh would make the browser redraw each plot.
    x_lim = next(([0, span] for span in X_SPANS if last < span), None)
    one = lr_is_d(d, lr)
    return [
        gr.LinePlot(value=loss, x_lim=x_lim),
        gr.LinePlot(value=d, x_lim=x_lim, title=ONE_PLOT_TITLE if one else PLOT_TITLES[1]),
        gr.LinePlot(value=lr, x_lim=x_lim, visible=not one),
    ]


def lr_is_d(d: pd.DataFrame | None, lr: pd.DataFrame | None) -> bool:
    """Whether the applied learning rate equals d at every plotted point (lr = 1 in every group); true
    before the first step, so a run starts with one plot."""
    if d is None or lr is None:
        return True
    if len(d) != len(lr):
        return False
    left = d.sort_values(["series", "step"], kind="stable")
    right = lr.sort_values(["series", "step"], kind="stable")
    return bool(
        (left["series"].to_numpy() == right["series"].to_numpy()).all()
        and np.allclose(left["d"].to_numpy(), right["lr"].to_numpy(), rtol=1e-9, atol=0)
    )


def _with_log(frame: pd.DataFrame | None, column: str, log_column: str) -> pd.DataFrame | None:
    """The table with log10 of `column` added; rows whose value has no logarithm (0, negative) dropped."""
    if frame is None or not len(frame):
        return frame
    positive = frame[frame[column] > 0].copy()
    positive[log_column] = np.log10(positive[column].to_numpy())
    return positive


def samples_gallery(elem_id: str) -> gr.Gallery:
    """A gallery of sample images, newest first."""
    return gr.Gallery(
        label="Samples (newest first)",
        columns=8,
        height=280,
        object_fit="contain",
        fit_columns=False,
        elem_id=elem_id,
    )


def run_names(ctx: UiContext) -> list[str]:
    """The run folders' names, newest first."""
    return [p.name for p in runner.list_run_dirs(ctx.runs_dir)]
