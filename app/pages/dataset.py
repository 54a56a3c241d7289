"""The Dataset page: the dataset set on the Setup page scanned as the trainer will see it."""

from __future__ import annotations

from typing import Any

import gradio as gr

from app.dataset_view import dataset_overview
from app.pages.common import UiContext
from app.pages.setup import SetupTab


def build(ctx: UiContext, setup: SetupTab) -> None:
    gr.Markdown("Scans the dataset set on the Setup tab (path, caption extension, resolution, buckets).")
    scan = gr.Button("Scan dataset", variant="primary", elem_id="scan-dataset")
    summary = gr.Markdown(elem_id="dataset-summary")
    gallery = gr.Gallery(
        label="Images and captions",
        columns=8,
        height=420,
        object_fit="contain",
        fit_columns=False,
        elem_id="dataset-gallery",
    )
    with gr.Row():
        buckets = gr.BarPlot(x="bucket", y="images", title="Images per bucket", elem_id="bucket-plot")
        skipped = gr.Dataframe(label="Skipped files", interactive=False, elem_id="skipped-files")
    keys = [
        "dataset.path",
        "dataset.caption_extension",
        "dataset.resolution",
        "dataset.max_aspect",
        "dataset.no_upscale",
    ]
    inputs = [setup.by_key(ctx.specs, key) for key in keys]
    scan.click(_scan_dataset, inputs, [summary, gallery, buckets, skipped])


def _scan_dataset(path: str, extension: str, resolution: Any, max_aspect: Any, no_upscale: bool) -> list[Any]:
    try:
        overview = dataset_overview(
            path or "", extension, int(resolution or 1024), float(max_aspect or 2.0), no_upscale
        )
    except (TypeError, ValueError) as error:
        return [f"⚠ {error}", [], None, None]
    if overview.problem:
        return [f"⚠ {overview.problem}", [], None, None]
    return [overview.summary, overview.thumbnails, overview.buckets, overview.skipped]
