"""The Dataset page: the dataset set on the Setup page scanned as the trainer will see it, its captions
edited in place, and a new dataset made from uploaded images or a zip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from app.dataset_files import (
    DatasetFileError,
    create_dataset,
    default_datasets_dir,
    read_caption,
    write_caption,
)
from app.dataset_view import dataset_overview
from app.pages.common import UiContext
from app.pages.setup import SetupTab

SCANNED_KEYS = (
    "dataset.path",
    "dataset.caption_extension",
    "dataset.resolution",
    "dataset.max_aspect",
    "dataset.no_upscale",
)


def build(ctx: UiContext, setup: SetupTab) -> None:
    datasets_dir = ctx.datasets_dir or default_datasets_dir(ctx.runs_dir)
    gr.Markdown(
        "Scans the dataset set on the Setup tab (path, caption extension, resolution, buckets). "
        "Click an image to edit its caption."
    )
    scan = gr.Button("Scan dataset", variant="primary", elem_id="scan-dataset")
    summary = gr.Markdown(elem_id="dataset-summary")
    gallery = gr.Gallery(
        label="Images and captions",
        columns=8,
        height=420,
        object_fit="contain",
        fit_columns=False,
        allow_preview=False,
        elem_id="dataset-gallery",
    )
    shown = gr.State([])  # the listed images' paths, in gallery order (only these can be captioned)
    chosen = gr.State("")
    with gr.Row(equal_height=True):
        caption = gr.Textbox(
            label="Caption", placeholder="click an image above", lines=2, scale=4, elem_id="caption-text"
        )
        save_caption = gr.Button("Save caption", scale=1, elem_id="caption-save")
    caption_message = gr.Markdown(elem_id="caption-message")
    with gr.Row():
        buckets = gr.BarPlot(
            x="bucket", y="images", title="Images per bucket", y_lim=[0, None], elem_id="bucket-plot"
        )
        skipped = gr.Dataframe(label="Skipped files", interactive=False, elem_id="skipped-files")
    with gr.Accordion("New dataset from uploaded images or a zip", open=False, elem_id="dataset-new"):
        gr.Markdown(
            f"Makes a new folder in `{datasets_dir}` with the images and their same-named .txt captions, "
            "and sets it as the dataset on the Setup tab."
        )
        with gr.Row(equal_height=True):
            new_name = gr.Textbox(
                label="Dataset name", placeholder="e.g. my-cat", scale=2, elem_id="dataset-name"
            )
            uploads = gr.File(
                label="Images, captions or a .zip", file_count="multiple", type="filepath",
                file_types=["image", ".txt", ".caption", ".zip"], height=140, scale=3, elem_id="dataset-files",
            )  # fmt: skip
        create = gr.Button("Create dataset", elem_id="dataset-create")
        create_message = gr.Markdown(elem_id="dataset-create-message")

    inputs = [setup.by_key(ctx.specs, key) for key in SCANNED_KEYS]
    path_field, extension_field = inputs[0], inputs[1]
    scan_outputs = [summary, gallery, buckets, skipped, shown, chosen, caption, caption_message]
    scan.click(_scan_dataset, inputs, scan_outputs, api_name="scan_dataset")
    gallery.select(_choose_image, [shown, extension_field], [chosen, caption, caption_message])
    save_caption.click(
        _save_caption,
        [chosen, shown, extension_field, caption],
        [caption_message, gallery],
        api_name="save_caption",
    )
    create.click(
        lambda name, files: _create(datasets_dir, name, files),
        [new_name, uploads],
        [create_message, path_field],
        api_name="create_dataset",
    ).success(_scan_dataset, inputs, scan_outputs)


def _scan_dataset(path: str, extension: str, resolution: Any, max_aspect: Any, no_upscale: bool) -> list[Any]:
    """Updates for the summary, gallery, bucket chart, skipped files and the caption editor."""
    cleared = [[], "", "", ""]  # nothing chosen after a new scan
    try:
        overview = dataset_overview(
            path or "", extension, int(resolution or 1024), float(max_aspect or 2.0), no_upscale
        )
    except (TypeError, ValueError) as error:
        return [f"⚠ {error}", [], None, None, *cleared]
    if overview.problem:
        return [f"⚠ {overview.problem}", [], None, None, *cleared]
    shown = [str(p) for p in overview.paths]
    return [overview.summary, overview.thumbnails, overview.buckets, overview.skipped, shown, "", "", ""]


def _choose_image(shown: list[str], extension: str, event: gr.SelectData) -> list[Any]:
    index = event.index if isinstance(event.index, int) else None
    if index is None or not 0 <= index < len(shown):
        return ["", "", "Scan the dataset again: the gallery changed."]
    image = Path(shown[index])
    try:
        text = read_caption(image, extension)
    except (DatasetFileError, OSError, UnicodeDecodeError) as error:
        return ["", "", f"⚠ {error}"]
    return [str(image), text, f"Editing the caption of `{image.name}`."]


def _save_caption(chosen: str, shown: list[str], extension: str, text: str) -> list[Any]:
    if not chosen:
        return ["Click an image first.", gr.skip()]
    try:
        path = write_caption(Path(chosen), [Path(p) for p in shown], extension, text or "")
    except (DatasetFileError, OSError) as error:
        return [f"⚠ Not saved: {error}", gr.skip()]
    return [f"Saved `{path.name}`. Scan again to see it under the image.", gr.skip()]


def _create(datasets_dir: Path, name: str, files: list[str] | None) -> list[Any]:
    try:
        made = create_dataset(datasets_dir, name, files or [])
    except (DatasetFileError, OSError) as error:
        raise gr.Error(f"Dataset not created: {error}", print_exception=False) from None
    text = f"Created `{made.folder}`: {made.images} images, {made.captions} captions."
    if made.ignored:
        text += f" Left out (not images or captions): {', '.join(made.ignored[:10])}"
        text += "…" if len(made.ignored) > 10 else ""
    return [text, str(made.folder)]
