"""The Runs page: every run in the runs folder as a table; one opened with its plots, samples and config."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from app import compare_view as compare
from app import events_view as view
from app.health_banner import banner_markdown
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
    _build_compare(ctx, tab, refresh)


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
    notices = "\n\n".join(
        n for n in (banner_markdown(snap.events), view.notices_markdown(snap.events, snap.state)) if n
    )
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


# ---------------------------------------------------------------- compare runs (app/compare_view.py)
def _build_compare(ctx: UiContext, tab: gr.Tab, refresh: gr.Button) -> None:
    with gr.Column(elem_id="compare-section"):
        _compare_widgets(ctx, tab, refresh)


def _compare_widgets(ctx: UiContext, tab: gr.Tab, refresh: gr.Button) -> None:
    gr.Markdown(
        "## Compare runs\nOverlay two or more runs by step: what a d_coef, rank or dataset change did."
    )
    with gr.Row():
        chosen = gr.Dropdown(
            label="Runs to compare", choices=[], multiselect=True, elem_id="compare-choice", scale=4
        )
        go = gr.Button("Compare", elem_id="compare-go", scale=1)
    message = gr.Markdown(elem_id="compare-message")
    summary = gr.Dataframe(label="Each run", interactive=False, elem_id="compare-summary")
    with gr.Row():
        loss = gr.LinePlot(
            None, x="step", y="training loss", color="run", title="Training loss (EMA, at y)",
            height=280, elem_id="compare-plot-loss",
        )  # fmt: skip
        validation = gr.LinePlot(
            None, x="step", y="validation loss", color="run", title="Validation loss (at x, exported weights)",
            height=280, elem_id="compare-plot-validation",
        )  # fmt: skip
        d = gr.LinePlot(
            None, x="step", y="log10 d", color="series", title="Prodigy's d (log10: -4 is 1e-4)",
            height=280, elem_id="compare-plot-d",
        )  # fmt: skip
    differences_caption = gr.Markdown(elem_id="compare-differences-caption")
    differences = gr.Dataframe(
        label="Config values that differ", interactive=False, elem_id="compare-differences"
    )

    def names(previous: list[str] | None) -> Any:
        available = run_names(ctx)
        kept = [name for name in previous or [] if name in available]
        return gr.Dropdown(choices=available, value=kept)

    for event in (tab.select, refresh.click):
        event(names, chosen, chosen, api_visibility="undocumented")

    def run_compare(selected: list[str] | None) -> Iterator[list[Any]]:
        yield [gr.skip(), gr.skip(), None, None, None, gr.skip(), gr.skip()]  # clear first: see _plot_resets
        yield _compare(ctx, selected or [])

    go.click(
        run_compare,
        chosen,
        [message, summary, loss, validation, d, differences_caption, differences],
        api_name="compare",
    )


def _compare(ctx: UiContext, selected: list[str]) -> list[Any]:
    run_dirs = [resolve_run(ctx.runs_dir, name) for name in selected]
    unknown = [name for name, run_dir in zip(selected, run_dirs) if run_dir is None]
    if unknown:
        return [f"⚠ No run named {', '.join(unknown)}; press Refresh.", *[gr.skip()] * 6]
    try:
        runs = compare.load_runs([p for p in run_dirs if p is not None])
    except compare.CompareError as error:
        return [f"⚠ {str(error).capitalize()}.", *[gr.skip()] * 6]
    table = compare.config_differences(runs)
    validated = compare.validation_overlay(runs)
    note = "" if validated is not None else " None of them has validation results (set dataset.validation)."
    return [
        f"Comparing {', '.join(run.name for run in runs)}, aligned by step.{note}",
        compare.summary_table(runs),
        compare.loss_overlay(runs),
        validated,
        compare.d_overlay(runs),
        compare.differences_caption(runs, table),
        table,
    ]
