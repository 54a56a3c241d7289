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
from app.pages.common import (
    MEMORY_PENDING,
    UiContext,
    marks,
    plot_frames,
    plot_updates,
    run_plots,
    samples_gallery,
)
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


def build(
    ctx: UiContext, setup: SetupTab, current_run: gr.State, tabs: gr.Tabs, refresh_seconds: float
) -> RunTab:
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
    shown_alive = gr.State(False)  # whether the trainer was running at the last refresh
    inputs = [current_run, signature, plot_keys, shown_alive]
    outputs = [current_run, signature, plot_keys, title, progress, status, *plots, samples, log]
    outputs += [message, shown_alive]

    start.click(
        lambda *values: _start(ctx, values[:-1], values[-1]),
        [*setup.fields, setup.gpus],
        [message, current_run, setup.name, *setup.marks],
        api_name="start",
    )

    def start_from_setup(*values: Any) -> list[Any]:
        text, run_dir, name, *problem_marks = _start(ctx, values[:-1], values[-1])
        if not isinstance(run_dir, str):
            return [text, gr.skip(), gr.skip(), name, gr.skip(), *problem_marks]
        return ["", text, run_dir, name, gr.Tabs(selected="run"), *problem_marks]

    setup.start.click(
        start_from_setup,
        [*setup.fields, setup.gpus],
        [setup.message, message, current_run, setup.name, tabs, *setup.marks],
        api_name="start_from_setup",
    )
    # A refusal stays until the form changes: then it no longer describes the form.
    gr.on(
        [field.change for field in setup.fields],
        lambda *texts: ["" if (text or "").startswith(NOT_STARTED) else gr.skip() for text in texts],
        [message, setup.message],
        [message, setup.message],
        show_progress="hidden",
        api_visibility="undocumented",
        trigger_mode="always_last",
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
    resume.click(
        lambda current, gpus: _resume(ctx, current, gpus),
        [current_run, setup.gpus],
        message,
        api_name="resume",
    )

    def refresh(current: str, sig: str, keys: list[str], alive: bool) -> Iterator[list[Any]]:
        yield from _refresh_run(ctx, current, sig, keys, alive)

    def redraw(current: str, sig: str, keys: list[str], alive: bool) -> Iterator[list[Any]]:
        yield from _refresh_run(ctx, current, "", keys, alive)

    hidden = {"show_progress": "hidden", "api_visibility": "undocumented"}
    gr.Timer(refresh_seconds).tick(refresh, inputs, outputs, **hidden)
    current_run.change(redraw, inputs, outputs, **hidden)
    resolve = lambda current: _current(ctx, current)  # noqa: E731
    run_insight.wire(resolve, current_run, controls, banner, validation, refresh_seconds)
    return RunTab(inputs=inputs, outputs=outputs, redraw=redraw, memory=memory)


NOT_STARTED = "**Not started"


def _current(ctx: UiContext, current: str) -> Path | None:
    path = Path(current) if current else None
    return path if path is not None and path.is_dir() else default_run(ctx.runs_dir)


def _refresh_run(
    ctx: UiContext, current: str, signature: str, keys: list[str], shown_alive: bool = False
) -> Iterator[list[Any]]:
    """Updates for the Run tab's outputs (see build); skips everything when the run's files are unchanged.

    When the trainer has ended since the last refresh, the message of the button that started or stopped
    it is cleared (the title now says what happened), and the progress loses its speed and ETA.
    """
    skip = gr.skip()
    run_dir = _current(ctx, current)
    if run_dir is None:
        yield ["", "", [], "No runs yet: set one up on the Setup tab and press Start.", *[skip] * 9]
        return
    new_signature = change_signature(run_dir)
    if new_signature == signature and str(run_dir) == current:
        yield [skip] * 13
        return
    snap = snapshot(run_dir, LOG_LINES)
    frames = plot_frames(snap.frames)
    new_keys = _series_keys(run_dir, frames)
    if new_keys != keys:
        yield [*[skip] * 6, *_plot_resets(new_keys, keys), *[skip] * 4]
    ended = bool(shown_alive) and not snap.alive
    yield [
        str(run_dir),
        new_signature,
        new_keys,
        snap.title,
        view.progress_html(view.progress(snap.events), live=snap.alive),
        snap.status_markdown(),
        *plot_updates(frames),
        view.sample_images(snap.events),
        snap.log,
        "" if ended else skip,
        snap.alive,
    ]


def _gpus(ctx: UiContext, asked: float | None) -> int:
    """The GPU count a run starts on: what Setup asks, within the GPUs here (1 where there are fewer than 2)."""
    return min(max(int(asked or 1), 1), ctx.gpus_present) if ctx.gpus_present > 1 else 1


def _start(ctx: UiContext, values: tuple, gpus: float | None = 1) -> list[Any]:
    """Updates for the message, the run shown, the name field and the Setup problem marks.

    A name whose folder already holds a run gets the next free one (demo-2) rather than a refusal.
    """
    config, problems = form.validate_values(list(values), ctx.specs)
    name, note = gr.skip(), ""
    if config is not None:
        config, note = runner.with_free_name(config)
        name = config.name if note else gr.skip()
        problems, _ = preflight(config, ctx.runs_dir)
    if problems:
        text = f"{NOT_STARTED}.** Fix these on the Setup tab first:\n" + "\n".join(f"- {p}" for p in problems)
        # the name stays as typed: changing it would count as an edit and clear this refusal
        return [text, gr.skip(), gr.skip(), *marks(ctx, problems)]
    try:
        run_dir = runner.start_run(config, ctx.allow_parallel_runs, _gpus(ctx, gpus))
    except runner.RunnerError as error:
        return [f"{NOT_STARTED}:** {error}", gr.skip(), name, *marks(ctx, [])]
    text = f"Started **{run_dir.name}**; the plots fill in as it trains." + (f" {note}" if note else "")
    return [text, str(run_dir), name, *marks(ctx, [])]


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


def _resume(ctx: UiContext, current: str, gpus: float | None = 1) -> str:
    run_dir = _current(ctx, current)
    if run_dir is None:
        return "No run to resume."
    try:
        runner.resume_run(run_dir, ctx.allow_parallel_runs, _gpus(ctx, gpus))
    except runner.RunnerError as error:
        return f"**Not resumed:** {error}"
    checkpoints = list_checkpoints(run_dir)
    origin = f"step {checkpoints[-1][0]}" if checkpoints else "the start (it has no checkpoint yet)"
    return f"Resuming **{run_dir.name}** from {origin}."
