"""What several pages share: the UI's settings, the problem marks of the Setup form, the run plots and the
sample gallery (drawn alike on the Run and Runs pages), the list of run names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
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


def run_plots(prefix: str) -> list[gr.LinePlot]:
    """The loss, d and d·lr plots of a run (elem ids `{prefix}plot-loss`, `-d`, `-lr`)."""
    with gr.Row():
        loss = gr.LinePlot(
            None, x="step", y="loss", color="series", title=PLOT_TITLES[0],
            height=280, elem_id=f"{prefix}plot-loss",
        )  # fmt: skip
        d = gr.LinePlot(
            None, x="step", y="d", color="series", title=PLOT_TITLES[1],
            height=280, elem_id=f"{prefix}plot-d",
        )  # fmt: skip
        lr = gr.LinePlot(
            None, x="step", y="lr", color="series",
            title=PLOT_TITLES[2], height=280, elem_id=f"{prefix}plot-lr",
        )  # fmt: skip
    return [loss, d, lr]


def plot_frames(frames: list[pd.DataFrame]) -> list[pd.DataFrame | None]:
    """The snapshot's loss, d and d·lr tables; None for an empty one (an empty table would fix an empty legend)."""
    return [frame if len(frame) else None for frame in frames]


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
