"""The Runs page: every run in the runs folder as a table; one opened with its plots, samples and config."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from app import events_view as view
from app.pages.common import UiContext, plot_frames, plot_updates, run_names, run_plots, samples_gallery
from app.run_view import resolve_run, runs_table, snapshot


def build(ctx: UiContext, tab: gr.Tab, tabs: gr.Tabs, current_run: gr.State) -> None:
    refresh = gr.Button("Refresh", elem_id="runs-refresh")
    table = gr.Dataframe(label="Runs", interactive=False, elem_id="runs-table")
    with gr.Row():
        choice = gr.Dropdown(label="Run", choices=[], elem_id="runs-choice", scale=3)
        open_run = gr.Button("Open", elem_id="runs-open", scale=1)
        show = gr.Button("Show on the Run tab", elem_id="runs-show", scale=1)
    summary = gr.Markdown(elem_id="runs-summary")
    plots = run_plots("runs-")
    samples = samples_gallery("runs-samples")
    config = gr.Code(
        label="config.toml", language=None, interactive=False, max_lines=40, elem_id="runs-config"
    )

    def listing() -> list[Any]:
        names = run_names(ctx)
        return [runs_table(ctx.runs_dir), gr.Dropdown(choices=names, value=names[0] if names else None)]

    for event in (tab.select, refresh.click):
        event(listing, None, [table, choice])

    def open_selected(name: str | None) -> Iterator[list[Any]]:
        yield [gr.skip(), None, None, None, gr.skip(), gr.skip()]  # clear first: see _plot_resets
        yield _open_run(ctx, name)

    open_run.click(open_selected, choice, [summary, *plots, samples, config])
    show.click(lambda name: _show_run(ctx, name), choice, [current_run, tabs])


def _open_run(ctx: UiContext, name: str | None) -> list[Any]:
    run_dir = resolve_run(ctx.runs_dir, name)
    if run_dir is None:
        return ["Choose a run.", *[gr.skip()] * 5]
    snap = snapshot(run_dir)
    summary = view.run_summary(snap.events, snap.state)
    config_path = run_dir / "config.toml"
    text = [
        snap.title,
        view.progress(snap.events).text(live=snap.alive),
        f"final d: {view.format_d(summary['final_d']) or 'n/a'} · samples: {summary['samples']}",
    ]
    text += [f"exported: `{p}`" for p in summary["exported"]]
    notices = view.notices_markdown(snap.events, snap.state)
    return [
        "\n\n".join(text + ([notices] if notices else [])),
        *plot_updates(plot_frames(snap.frames)),
        view.sample_images(snap.events),
        config_path.read_text(encoding="utf-8") if config_path.is_file() else "(no config.toml yet)",
    ]


def _show_run(ctx: UiContext, name: str | None) -> list[Any]:
    run_dir = resolve_run(ctx.runs_dir, name)
    if run_dir is None:
        return [gr.skip(), gr.skip()]
    return [str(run_dir), gr.Tabs(selected="run")]
