"""The Export page: a run's checkpoint written as LoRA files (kohya and diffusers formats)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.best_export import best_summary, export_best
from app.export_view import FORMATS, checkpoint_choices, export_lora, exported_markdown, metadata_by_file
from app.pages.common import UiContext, run_names
from app.run_view import exportable_run, resolve_run


def build(ctx: UiContext, tab: gr.Tab) -> None:
    gr.Markdown(
        "Writes the checkpoint's eval-mode LoRA (the schedule-free average) to `runs/<name>/lora/`: "
        "**kohya** for ComfyUI / A1111 / Forge, **diffusers** for `load_lora_weights`."
    )
    with gr.Row():
        run = gr.Dropdown(label="Run", choices=[], elem_id="export-run")
        checkpoint = gr.Dropdown(label="Checkpoint", choices=[], elem_id="export-checkpoint")
        formats = gr.CheckboxGroup(
            choices=list(FORMATS), value=list(FORMATS), label="Formats", elem_id="export-formats"
        )
    with gr.Row():
        export = gr.Button("Export", variant="primary", elem_id="export")
        export_best_button = gr.Button("Export the best-validation checkpoint", elem_id="export-best")
    best_info = gr.Markdown(elem_id="export-best-info")
    result = gr.Markdown(elem_id="export-result")
    files = gr.File(label="Files", file_count="multiple", interactive=False, elem_id="export-files")
    metadata = gr.JSON(label="Metadata", elem_id="export-metadata")

    def runs() -> Any:
        newest = exportable_run(ctx.runs_dir)
        return gr.Dropdown(choices=run_names(ctx), value=newest.name if newest else None)

    tab.select(runs, None, run)
    run.change(lambda name: _checkpoints(ctx, name), run, checkpoint)
    run.change(lambda name: best_summary(resolve_run(ctx.runs_dir, name)), run, best_info)
    export.click(
        lambda name, step, fmts: _export(ctx, name, step, fmts),
        [run, checkpoint, formats],
        [result, files, metadata],
        api_name="export",
    )
    export_best_button.click(
        lambda name, fmts: _export_best(ctx, name, fmts),
        [run, formats],
        [result, files, metadata],
        api_name="export_best",
    )


def _checkpoints(ctx: UiContext, name: str | None) -> Any:
    choices = checkpoint_choices(resolve_run(ctx.runs_dir, name))
    return gr.Dropdown(choices=choices, value=choices[0][1] if choices else None)


def _export(ctx: UiContext, name: str | None, step: Any, formats: list[str]) -> list[Any]:
    run_dir = resolve_run(ctx.runs_dir, name)
    if run_dir is None:
        return ["⚠ Choose a run.", None, None]
    if step is None:
        return [f"⚠ {name} has no checkpoint yet.", None, None]
    try:
        written = export_lora(run_dir, int(step), formats)
    except (OSError, ValueError) as error:
        return [f"⚠ Export failed: {error}", None, None]
    return [exported_markdown(written), [str(f.path) for f in written], metadata_by_file(written)]


def _export_best(ctx: UiContext, name: str | None, formats: list[str]) -> list[Any]:
    """As `python -m trainers export RUN --best`: the checkpoint at the lowest validation loss."""
    run_dir = resolve_run(ctx.runs_dir, name)
    if run_dir is None:
        return ["⚠ Choose a run.", None, None]
    try:
        written = export_best(run_dir, formats)
    except (OSError, ValueError) as error:
        return [f"⚠ Not exported: {error}", None, None]
    return [exported_markdown(written), [str(f.path) for f in written], metadata_by_file(written)]
