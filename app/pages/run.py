"""The Run page: Start, Stop, Resume and Kill of the run shown, its progress, plots, samples and log tail,
refreshed from the run folder on a timer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app import config_form as form
from app import events_view as view
from app import run_controls, run_insight, runner
from app.pages.common import MEMORY_PENDING, UiContext, marks, plot_frames, run_plots, samples_gallery
from app.pages.setup import SetupTab
from app.preflight import preflight
from app.run_view import change_signature, default_run, snapshot
from trainers.checkpoint import list_checkpoints
from trainers.control import trainer_running
from trainers.events import read_events

LOG_LINES = 20


@dataclass
class RunTab:
    """What the page-load event needs to fill the Run tab."""

    inputs: list[Any]  # current run, change signature, series drawn per plot
    outputs: list[Any]  # what _refresh_run fills
    redraw: Callable[..., Iterator[list[Any]]]
    memory: gr.Markdown  # the Setup form's memory estimate, shown beside Start


def _series_keys(run_dir: Path, frames: list[pd.DataFrame | None]) -> list[str]:
    """Per plot, the run and the set of series it draws ("" when empty)."""
    return [f"{run_dir}|{'|'.join(sorted(f['series'].unique()))}" if f is not None else "" for f in frames]


def _plot_resets(new_keys: list[str], old_keys: list[str]) -> list[Any]:
    """None for each plot whose series changed, else skip.

    The browser fixes a plot's colour legend when it first draws it and later only swaps the data, so a
    series that appears later (the freeze rule) or another run's groups would not be drawn. Clearing the
    plot first makes the next value draw from scratch.
    """
    old_keys = list(old_keys or []) + [""] * (len(new_keys) - len(old_keys or []))
    return [None if new != old else gr.skip() for new, old in zip(new_keys, old_keys)]


def build(ctx: UiContext, setup: SetupTab, current_run: gr.State, refresh_seconds: float) -> RunTab:
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="start")
        stop = gr.Button("Stop", variant="stop", elem_id="stop")
        resume = gr.Button("Resume", elem_id="resume")
        kill = gr.Button("Kill now…", size="sm", elem_id="kill")
    with gr.Row(visible=False, elem_id="kill-confirm-row") as kill_row:
        gr.Markdown(
            "**Abort the trainer now?** It saves nothing: the steps since its last checkpoint are lost."
        )
        kill_yes = gr.Button("Yes, kill it", variant="stop", elem_id="kill-confirm")
        kill_no = gr.Button("No, keep it", elem_id="kill-cancel")
    controls = run_insight.controls_row()
    memory = gr.Markdown(MEMORY_PENDING, elem_id="run-memory")
    message = gr.Markdown(elem_id="run-message")
    title = gr.Markdown(elem_id="run-title")
    progress = gr.HTML(view.progress_html(view.Progress(0, None, None, None)), elem_id="run-progress")
    status = gr.Markdown(elem_id="run-status")
    banner = run_insight.health_banner()
    plots = run_plots("")
    validation = run_insight.validation_plot()
    samples = samples_gallery("samples")
    log = gr.Textbox(
        label="train.log (tail)",
        lines=LOG_LINES,
        max_lines=LOG_LINES,
        interactive=False,
        autoscroll=True,
        elem_id="log-tail",
    )
    signature = gr.State("")
    plot_keys = gr.State([])
    inputs = [current_run, signature, plot_keys]
    outputs = [current_run, signature, plot_keys, title, progress, status, *plots, samples, log]

    start.click(
        lambda current, *values: _start(ctx, current, values),
        [current_run, *setup.fields],
        [message, current_run, setup.problems, *setup.section_problems, *setup.accordions],
        api_name="start",
    )
    stop.click(lambda current: _stop(ctx, current), current_run, message, api_name="stop")
    kill.click(lambda: gr.Row(visible=True), None, kill_row, api_visibility="undocumented")
    kill_no.click(lambda: gr.Row(visible=False), None, kill_row, api_visibility="undocumented")
    kill_yes.click(
        lambda current: [_kill(ctx, current), gr.Row(visible=False)],
        current_run,
        [message, kill_row],
        api_name="kill",
    )
    resume.click(lambda current: _resume(ctx, current), current_run, message, api_name="resume")

    def refresh(current: str, sig: str, keys: list[str]) -> Iterator[list[Any]]:
        yield from _refresh_run(ctx, current, sig, keys)

    def redraw(current: str, sig: str, keys: list[str]) -> Iterator[list[Any]]:
        yield from _refresh_run(ctx, current, "", keys)

    hidden = {"show_progress": "hidden", "api_visibility": "undocumented"}
    gr.Timer(refresh_seconds).tick(refresh, inputs, outputs, **hidden)
    current_run.change(redraw, inputs, outputs, **hidden)
    resolve = lambda current: _current(ctx, current)  # noqa: E731
    run_insight.wire(resolve, current_run, controls, banner, validation, refresh_seconds)
    return RunTab(inputs=inputs, outputs=outputs, redraw=redraw, memory=memory)


def _current(ctx: UiContext, current: str) -> Path | None:
    path = Path(current) if current else None
    return path if path is not None and path.is_dir() else default_run(ctx.runs_dir)


def _refresh_run(ctx: UiContext, current: str, signature: str, keys: list[str]) -> Iterator[list[Any]]:
    """Updates for the Run tab's outputs (see _run_tab); skips everything when the run's files are unchanged."""
    skip = gr.skip()
    run_dir = _current(ctx, current)
    if run_dir is None:
        yield ["", "", [], "No runs yet: set one up on the Setup tab and press Start.", *[skip] * 7]
        return
    new_signature = change_signature(run_dir)
    if new_signature == signature and str(run_dir) == current:
        yield [skip] * 11
        return
    snap = snapshot(run_dir, LOG_LINES)
    frames = plot_frames(snap.frames)
    new_keys = _series_keys(run_dir, frames)
    if new_keys != keys:
        yield [*[skip] * 6, *_plot_resets(new_keys, keys), skip, skip]
    yield [
        str(run_dir),
        new_signature,
        new_keys,
        snap.title,
        view.progress_html(view.progress(snap.events)),
        snap.status_markdown(),
        *frames,
        view.sample_images(snap.events),
        snap.log,
    ]


def _start(ctx: UiContext, current: str, values: tuple) -> list[Any]:
    config, problems = form.validate_values(list(values), ctx.specs)
    if config is not None:
        problems, _ = preflight(config, ctx.runs_dir)
    if problems:
        text = "**Not started.** Fix these on the Setup tab first:\n" + "\n".join(f"- {p}" for p in problems)
        return [text, gr.skip(), *marks(ctx, problems)]
    try:
        run_dir = runner.start_run(config, ctx.allow_parallel_runs)
    except runner.RunnerError as error:
        return [f"**Not started:** {error}", gr.skip(), *marks(ctx, [])]
    return [f"Started **{run_dir.name}**; the plots fill in as it trains.", str(run_dir), *marks(ctx, [])]


def _stop(ctx: UiContext, current: str) -> str:
    """Send the run's trainer its stop signal, once (a second one would abort it and lose steps)."""
    run_dir = _current(ctx, current)
    answer = runner.request_stop(run_dir) if run_dir is not None else "not running"
    if (
        answer == "not running" and run_dir is not None and trainer_running(run_dir)
    ):  # started from the command line
        return run_controls.send(run_dir, "stop")
    if answer == "not running":
        return "Nothing to stop: no trainer is running for this run."
    if answer == "already stopping":
        return (
            f"**{run_dir.name}** is already stopping (Stop was sent; pressing it again changes nothing). "
            "It exits after the current step; to abort without saving, use Kill now."
        )
    if not _has_stepped(read_events(run_dir)):
        return (
            f"Stopping **{run_dir.name}** while it starts: if it stops before its first step there is "
            "nothing to save; the title says what happened."
        )
    return f"Stopping **{run_dir.name}**: it finishes the current step, saves a checkpoint and exits."


def _has_stepped(events: list[dict]) -> bool:
    """Whether the trainer's current session has logged a step (so a stop will save a checkpoint)."""
    for event in reversed(events):
        if event.get("type") == "step":
            return True
        if event.get("type") in ("start", "resumed"):
            return False
    return False


def _kill(ctx: UiContext, current: str) -> str:
    run_dir = _current(ctx, current)
    if run_dir is None or not runner.abort_run(run_dir):
        return "Nothing to kill: no trainer is running for this run."
    return f"Killed **{run_dir.name}** without saving; Resume continues from its last checkpoint."


def _resume(ctx: UiContext, current: str) -> str:
    run_dir = _current(ctx, current)
    if run_dir is None:
        return "No run to resume."
    try:
        runner.resume_run(run_dir, ctx.allow_parallel_runs)
    except runner.RunnerError as error:
        return f"**Not resumed:** {error}"
    checkpoints = list_checkpoints(run_dir)
    origin = f"step {checkpoints[-1][0]}" if checkpoints else "the start (it has no checkpoint yet)"
    return f"Resuming **{run_dir.name}** from {origin}."
