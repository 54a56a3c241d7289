"""The Run page's view into the optimizer while it trains (issue 11): the live-control buttons and their
acknowledgements, the d-health banner, and the validation curve beside the training loss with the best step
marked. Built into the page by app/pages/run.py; refreshed on a timer of its own from the run folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from app import run_controls
from app.health_banner import banner_html
from app.run_view import change_signature, watch
from app.validation_view import PLOT_TITLE, training_points, validation_caption, validation_frame
from trainers.control import CONTROL_DIR

Resolve = Callable[[str], Path | None]  # the page's current-run state -> the run folder shown
BUTTONS = (("freeze", "Freeze d now"), ("sample", "Sample now"), ("checkpoint", "Checkpoint now"))


@dataclass
class Controls:
    message: gr.Markdown  # the answer to the last button pressed
    acknowledgements: gr.Markdown  # waiting requests and the trainer's answers
    buttons: dict[str, gr.Button]


@dataclass
class ValidationPlot:
    box: gr.Column  # hidden while the run has no validation result
    plot: gr.LinePlot
    caption: gr.Markdown


def controls_row() -> Controls:
    """Freeze d now / Sample now / Checkpoint now (Stop and Kill are the page's run buttons)."""
    with gr.Row(equal_height=True):
        gr.Markdown(
            "**Live controls**, acted on after the current step (Stop above also reaches a run started "
            "from the command line):"
        )
        buttons = {
            action: gr.Button(label, size="sm", elem_id=f"control-{action}") for action, label in BUTTONS
        }
    message = gr.Markdown(elem_id="control-message")
    acknowledgements = gr.Markdown(elem_id="control-acks")
    return Controls(message, acknowledgements, buttons)


def health_banner() -> gr.HTML:
    return gr.HTML("", elem_id="run-health")


def validation_plot() -> ValidationPlot:
    with gr.Column(visible=False) as box:
        plot = gr.LinePlot(
            None,
            x="step",
            y="loss",
            color="series",
            title=PLOT_TITLE,
            height=300,
            elem_id="plot-validation",
        )
    caption = gr.Markdown(elem_id="validation-caption")
    return ValidationPlot(box, plot, caption)


def wire(
    resolve: Resolve,
    current_run: gr.State,
    controls: Controls,
    banner: gr.HTML,
    validation: ValidationPlot,
    refresh_seconds: float,
) -> None:
    """The buttons' handlers, and the timer that keeps the acknowledgements, banner and plot current."""
    for action, button in controls.buttons.items():
        button.click(
            _sender(resolve, action),
            current_run,
            [controls.message, controls.acknowledgements],
            api_name=f"control_{action}",
        )
    signature = gr.State("")
    plot_key = gr.State("")
    outputs = [
        signature,
        plot_key,
        controls.acknowledgements,
        banner,
        validation.box,
        validation.plot,
        validation.caption,
    ]

    def refresh(current: str, sig: str, key: str) -> Iterator[list[Any]]:
        yield from _refresh(resolve(current), sig, key)

    def redraw(current: str, sig: str, key: str) -> Iterator[list[Any]]:
        yield from _refresh(resolve(current), "", key)

    hidden = {"show_progress": "hidden", "api_visibility": "undocumented"}
    gr.Timer(refresh_seconds).tick(refresh, [current_run, signature, plot_key], outputs, **hidden)
    current_run.change(redraw, [current_run, signature, plot_key], outputs, **hidden)


def _sender(resolve: Resolve, action: str) -> Callable[[str], list[str]]:
    def send(current: str) -> list[str]:
        run_dir = resolve(current)
        message = run_controls.send(run_dir, action)
        events = watch(run_dir).read()[0] if run_dir is not None else []
        return [message, run_controls.acknowledgements_markdown(run_dir, events)]

    return send


def signature_of(run_dir: Path) -> str:
    """change_signature plus the control folder (a request waiting changes it before any event)."""
    folder = run_dir / CONTROL_DIR
    control = folder.stat().st_mtime_ns if folder.is_dir() else "-"
    return f"{change_signature(run_dir)}|{control}"


def _refresh(run_dir: Path | None, sig: str, key: str) -> Iterator[list[Any]]:
    skip = gr.skip()
    if run_dir is None:
        yield ["", "", "", "", gr.Column(visible=False), skip, ""]
        return
    new_sig = signature_of(run_dir)
    if new_sig == sig:
        yield [skip] * 7
        return
    events, frames = watch(run_dir).read()
    frame = validation_frame(events, training_points(frames[0]))
    new_key = f"{run_dir}|{'|'.join(sorted(frame['series'].unique()))}" if frame is not None else ""
    if new_key != key:  # a new series (another best step, another run): clear first, see run._plot_resets
        yield [*[skip] * 5, None, skip]
    yield [
        new_sig,
        new_key,
        run_controls.acknowledgements_markdown(run_dir, events),
        banner_html(events),
        gr.Column(visible=frame is not None),
        frame,
        validation_caption(events),
    ]
