"""The Gradio Blocks: Setup, Dataset, Run, Runs and Export tabs wired to the modules that do the work.

Handlers here only translate between widgets and app.* functions; the run folder holds all run state,
so a page reload or a UI restart shows the same thing.
"""

from __future__ import annotations

import hashlib
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from app import config_form as form
from app import events_view as view
from app import runner
from app.dataset_view import dataset_overview
from app.export_view import FORMATS, checkpoint_choices, export_lora, exported_markdown, metadata_by_file
from app.path_checks import confined_file, file_problem, writable_file_problem
from app.preflight import preflight
from app.run_view import change_signature, default_run, resolve_run, runs_table, snapshot
from trainers.atomic import atomic_write_text
from trainers.checkpoint import list_checkpoints
from trainers.config import dump_config
from trainers.events import read_events
from trainers.memory import estimate_summary

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
DEFAULT_PRESET = "demo"
REFRESH_SECONDS = 2.0
FIELDS_PER_ROW = 3
LOG_LINES = 20

# System fonts only: the page must render offline, so nothing may be fetched from a font CDN.
THEME = gr.themes.Default(
    font=["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
)
CSS = """
.ppsf-progress progress { accent-color: var(--color-accent); }
.ppsf-progress-text { font-variant-numeric: tabular-nums; margin-top: 0.25em; }
.section-problems { color: var(--error-text-color, #b91c1c); }
#log-tail textarea { font-family: var(--font-mono); font-size: 0.85em; white-space: pre; overflow-x: auto; }
"""

MEMORY_PENDING = "**Memory estimate:** measured from the model's architecture once the form is filled in."
OPTIMIZER_HELP = """\
**Prodigy's d is the learning rate.** The optimizer estimates it while training: it starts at `d0` and grows
as long as the gradients say the weights are still far from where they are heading, then levels off.
`lr` only multiplies d, so keep it at 1.0; tune `d_coef` (e.g. 0.5 if the run overshoots). If d stays flat
at `d0`, raise `d0` (1e-5). The Run tab plots d and the applied learning rate d·lr for each parameter group.

**When to use `prodigy_steps`:** it freezes d after N steps (an integer), after a fraction of the run
(0.25), or `auto` once d stops growing. Freeze it on long runs where d keeps creeping up late, or to free
Prodigy's extra state; the moment it froze is marked on the d plot. 0 never freezes.

**Why there is no gradient clipping:** Prodigy measures d from the gradients themselves; clipping them
would feed it distorted gradients and skew the estimate. The step size is limited per tensor by
StableAdamW's update scaling (`use_stableadamw`), and schedule-free averaging smooths noisy steps, so a
clip norm is neither needed nor offered.
"""


@dataclass
class UiContext:
    """Settings the handlers share (never run state)."""

    runs_dir: Path
    presets_dir: Path
    allow_parallel_runs: bool
    configs_dir: Path  # the only folder "Save to file" writes to and, with presets_dir, "Load file" reads
    specs: list[form.FieldSpec] = field(default_factory=form.form_fields)


# ---------------------------------------------------------------- building
def build_ui(
    runs_dir: Path | str = "runs",
    presets_dir: Path | str = PRESETS_DIR,
    allow_parallel_runs: bool = False,
    refresh_seconds: float = REFRESH_SECONDS,
    configs_dir: Path | str | None = None,
) -> gr.Blocks:
    """The whole UI as a gr.Blocks (launch it with THEME and CSS).

    Config files are saved to and loaded from `configs_dir` (default: `configs/` beside the runs folder).
    """
    runs_path = Path(runs_dir).expanduser().resolve()
    runs_path.mkdir(parents=True, exist_ok=True)
    configs_path = default_configs_dir(runs_path) if configs_dir is None else Path(configs_dir)
    configs_path = configs_path.expanduser().resolve()
    configs_path.mkdir(parents=True, exist_ok=True)
    ctx = UiContext(
        runs_dir=runs_path,
        presets_dir=Path(presets_dir).resolve(),
        allow_parallel_runs=allow_parallel_runs,
        configs_dir=configs_path,
    )
    with gr.Blocks(title="ppsf-trainer") as demo:
        gr.Markdown(f"# ppsf-trainer\nLoRA training with Prodigy + ScheduleFree. Runs live in `{runs_path}`.")
        current_run = gr.State("")
        with gr.Tabs() as tabs:
            with gr.Tab("Setup", id="setup"):
                setup = _setup_tab(ctx)
            with gr.Tab("Dataset", id="dataset"):
                _dataset_tab(ctx, setup)
            with gr.Tab("Run", id="run"):
                run_tab = _run_tab(ctx, setup, current_run, refresh_seconds)
            with gr.Tab("Runs", id="runs") as runs_tab:
                _runs_tab(ctx, runs_tab, tabs, current_run)
            with gr.Tab("Export", id="export") as export_tab:
                _export_tab(ctx, export_tab)
        # The memory estimate follows the form (bursts of edits collapse into one estimate).
        gr.on(
            [field.change for field in setup.fields] + [setup.vram.change],
            lambda vram, *values: _memory_estimate(ctx, vram, values),
            [setup.vram, *setup.fields],
            [setup.memory, run_tab.memory],
            show_progress="hidden",
            api_name="memory_estimate",
            trigger_mode="always_last",
        )
        # A page reloaded (after a UI restart, say) gets back the form this browser last had.
        demo.load(
            lambda saved: _restore_form(ctx, saved),
            setup.saved_form,
            [*setup.fields, setup.message],
            show_progress="hidden",
            api_visibility="undocumented",
        )
        # A fresh page (or a restarted UI) shows the running or newest run at once.
        demo.load(
            run_tab.redraw,
            run_tab.inputs,
            run_tab.outputs,
            show_progress="hidden",
            api_visibility="undocumented",
        )

        def release_page(request: gr.Request) -> None:
            _release_session(demo, request.session_hash)

        demo.unload(release_page)
    return demo


def default_configs_dir(runs_dir: Path) -> Path:
    """configs/ beside the runs folder."""
    return Path(runs_dir).expanduser().resolve().parent / "configs"


def _release_session(demo: gr.Blocks, session_hash: str | None) -> None:
    """Forget a closed page's session at once.

    Gradio 6.31 keeps every session's state, including the last value sent to each output (the plots), until
    10,000 sessions have been opened; closing a page only schedules its gr.State values for deletion an
    hour later. This page's state is only which run it shows, which the run folder can tell again, so a page
    that comes back gets a fresh session showing the running or newest run.
    """
    holder = getattr(demo, "state_holder", None)
    if holder is None or session_hash is None or session_hash not in holder:
        return
    holder.delete_state(session_hash)  # runs the gr.State delete callbacks
    with holder.lock:
        holder.session_data.pop(session_hash, None)
        holder.time_last_used.pop(session_hash, None)


# ---------------------------------------------------------------- Setup tab
@dataclass
class SetupTab:
    """The Setup tab's widgets other tabs read or update."""

    fields: list[Any]  # one widget per form.form_fields() entry, in that order
    section_problems: list[gr.Markdown]
    accordions: list[gr.Accordion]
    problems: gr.Markdown
    message: gr.Markdown
    saved_form: gr.BrowserState  # the form as this browser last had it (local storage)
    vram: gr.Number  # the card to judge the memory estimate against
    memory: gr.Markdown  # the memory estimate of the form's config

    def by_key(self, specs: list[form.FieldSpec], key: str) -> Any:
        """The widget of a dotted config key."""
        return self.fields[[s.key for s in specs].index(key)]


def _setup_tab(ctx: UiContext) -> SetupTab:
    presets = form.list_presets(ctx.presets_dir)
    initial = _preset_values(ctx, DEFAULT_PRESET if DEFAULT_PRESET in presets else next(iter(presets), None))
    with gr.Row():
        preset = gr.Dropdown(
            choices=list(presets), value=DEFAULT_PRESET if DEFAULT_PRESET in presets else None,
            label="Preset", info="Ready configs from the presets folder.", elem_id="preset", scale=3,
        )  # fmt: skip
        load_preset = gr.Button("Load preset", elem_id="load-preset", scale=1)
    with gr.Row():
        toml_path = gr.Textbox(
            label="Config file (TOML)",
            placeholder="e.g. my-run.toml",
            info=f"A file in {ctx.configs_dir} (loading also reads presets in {ctx.presets_dir}).",
            elem_id="toml-path",
            scale=3,
        )
        load_file = gr.Button("Load file", elem_id="load-file", scale=1)
        save_file = gr.Button("Save to file", elem_id="save-file", scale=1)
    with gr.Row():
        upload = gr.File(
            label="…or upload a TOML", file_types=[".toml"], type="filepath", elem_id="upload-toml"
        )
        download = gr.File(label="Saved config", interactive=False, height=110, elem_id="download-toml")
    with gr.Row():
        check = gr.Button("Check", variant="primary", elem_id="check")
        vram = gr.Number(
            None,
            label="GPU memory (GB)",
            info="Empty: the GPU here, if any. The estimate below says whether the config fits it.",
            minimum=0,
            elem_id="vram",
        )
    memory = gr.Markdown(MEMORY_PENDING, elem_id="setup-memory")
    message = gr.Markdown(elem_id="setup-message")
    problems = gr.Markdown(elem_id="setup-problems")
    summary = gr.Textbox(label="Dataset summary", lines=4, interactive=False, elem_id="check-summary")

    fields, section_mds, accordions = [], [], []
    for section, title in form.SECTIONS:
        specs = [s for s in ctx.specs if s.section == section]
        with gr.Accordion(
            title, open=section in ("run", "model", "dataset", "training"), elem_id=f"section-{section}"
        ) as acc:
            section_mds.append(
                gr.Markdown(visible=False, elem_id=f"problems-{section}", elem_classes="section-problems")
            )
            if section == "optimizer":
                gr.Markdown(OPTIMIZER_HELP, elem_id="optimizer-help")
            for start in range(0, len(specs), FIELDS_PER_ROW):
                with gr.Row(equal_height=True):
                    for spec in specs[start : start + FIELDS_PER_ROW]:
                        fields.append(_field_widget(spec, initial[ctx.specs.index(spec)]))
        accordions.append(acc)
    saved_form = gr.BrowserState(
        None, storage_key=_form_storage_key(ctx), secret=_browser_secret(ctx.runs_dir)
    )
    # Every edit goes to the browser's local storage, so a reload or a UI restart loses nothing unsaved.
    gr.on(
        [field.change for field in fields],
        lambda *values: form.form_snapshot(values, ctx.specs),
        fields,
        saved_form,
        show_progress="hidden",
        api_visibility="undocumented",
        trigger_mode="always_last",
    )
    tab = SetupTab(
        fields=fields,
        section_problems=section_mds,
        accordions=accordions,
        problems=problems,
        message=message,
        saved_form=saved_form,
        vram=vram,
        memory=memory,
    )
    marks = [problems, *section_mds, *accordions]

    load_preset.click(
        lambda name: _load_preset(ctx, name), preset, [*fields, message, *marks], api_name="load_preset"
    )
    load_file.click(
        lambda path: _load_file(ctx, path), toml_path, [*fields, message, *marks], api_name="load_file"
    )
    upload.upload(
        lambda path: _load_upload(ctx, path), upload, [*fields, message, *marks], api_name="upload_config"
    )
    save_file.click(
        lambda path, *values: _save_file(ctx, path, values),
        [toml_path, *fields],
        [message, download, *marks],
        api_name="save_file",
    )
    check.click(lambda *values: _check(ctx, values), fields, [summary, *marks], api_name="check")
    return tab


BROWSER_SECRET_FILE = ".ui-browser-secret"


def _browser_secret(runs_dir: Path) -> str:
    """The key the kept form is encrypted with in the browser: one per runs folder, kept across restarts
    (Gradio's default is a new one each start, which would make the kept form unreadable after one)."""
    path = Path(runs_dir) / BROWSER_SECRET_FILE
    if not path.is_file():
        atomic_write_text(path, secrets.token_urlsafe(24))
        path.chmod(0o600)
    return path.read_text(encoding="utf-8").strip()


def _form_storage_key(ctx: UiContext) -> str:
    """One local-storage entry per runs folder: two UIs on one address keep their forms apart."""
    return "ppsf-setup-form-" + hashlib.sha256(str(ctx.runs_dir).encode()).hexdigest()[:12]


def _restore_form(ctx: UiContext, saved: Any) -> list[Any]:
    """Updates putting back the form this browser kept (skips when it kept none)."""
    values = form.restorable_values(saved, ctx.specs)
    if not values:
        return [gr.skip()] * (len(ctx.specs) + 1)
    fields = [values[spec.key] if spec.key in values else gr.skip() for spec in ctx.specs]
    return [*fields, "Restored the form as this browser last had it (its edits are kept as you type)."]


def _field_widget(spec: form.FieldSpec, value: Any) -> Any:
    common = {"label": spec.name, "info": spec.info, "elem_id": spec.elem_id, "value": value}
    if spec.key == "output_dir":
        return gr.Textbox(
            **{**common, "info": "The runs folder of this UI (set with --runs-dir)."}, interactive=False
        )
    if spec.kind == "checkbox":
        return gr.Checkbox(**common)
    if spec.kind == "dropdown":
        return gr.Dropdown(choices=list(spec.choices), **common)
    if spec.kind == "choices":
        return gr.CheckboxGroup(choices=list(spec.choices), **common)
    if spec.kind == "number":
        return gr.Number(precision=0 if spec.integer else None, **common)
    if spec.kind == "optional_number":
        return gr.Textbox(placeholder="not set", **common)
    if spec.kind == "lines":
        return gr.Textbox(lines=3, **common)
    return gr.Textbox(**common)


def _preset_values(ctx: UiContext, name: str | None) -> list[Any]:
    data: dict[str, Any] = {}
    if name:
        data, _ = form.read_toml(form.list_presets(ctx.presets_dir)[name])
    return form.values_from_config(_in_runs_dir(ctx, data), ctx.specs)


def _in_runs_dir(ctx: UiContext, data: dict[str, Any]) -> dict[str, Any]:
    """The config with output_dir set to this UI's runs folder (the only one it manages)."""
    return {**data, "output_dir": str(ctx.runs_dir)}


def _marks(ctx: UiContext, problems: list[str]) -> list[Any]:
    """Updates for the overall problem list, each section's problem list and each accordion."""
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


def _load_data(ctx: UiContext, data: dict[str, Any], source: str) -> list[Any]:
    data = _in_runs_dir(ctx, data)
    _, problems = form.validate_dict(data)
    values = form.values_from_config(data, ctx.specs)
    note = f"Loaded {source}." + (" It has problems, listed below." if problems else "")
    return [*values, note, *_marks(ctx, problems)]


def _unchanged_fields(ctx: UiContext, message: str, problems: list[str]) -> list[Any]:
    return [*[gr.skip()] * len(ctx.specs), message, *_marks(ctx, problems)]


def _load_preset(ctx: UiContext, name: str | None) -> list[Any]:
    presets = form.list_presets(ctx.presets_dir)
    if not name or name not in presets:
        return _unchanged_fields(ctx, "Choose a preset first.", [])
    data, problems = form.read_toml(presets[name])
    if problems:
        return _unchanged_fields(ctx, f"Could not read preset {name}.", problems)
    return _load_data(ctx, data, f"preset **{name}**")


def _load_file(ctx: UiContext, typed: str | None) -> list[Any]:
    """Load a config typed as a name in the configs folder, or a path inside it or the presets folder."""
    folders = [ctx.configs_dir, ctx.presets_dir]
    path, problem = confined_file(typed or "", ctx.configs_dir, folders, "config file", (".toml",))
    if path is None:
        return _unchanged_fields(ctx, "Nothing loaded.", [problem])
    problem = file_problem(path, "config file", suffixes=(".toml",))
    if problem:
        return _unchanged_fields(ctx, "Nothing loaded.", [problem])
    data, problems = form.read_config_file(path)
    if problems:
        return _unchanged_fields(ctx, "Nothing loaded.", problems)
    return _load_data(ctx, data, f"`{path}`")


def _load_upload(ctx: UiContext, path: str | None) -> list[Any]:
    """Load an uploaded config (Gradio keeps uploads in its own cache folder)."""
    if not path:
        return _unchanged_fields(ctx, "Nothing loaded.", [])
    data, problems = form.read_config_file(Path(path))
    if problems:
        return _unchanged_fields(
            ctx, "Nothing loaded.", [p.replace(str(path), "the upload") for p in problems]
        )
    return _load_data(ctx, data, "the uploaded file")


def _save_file(ctx: UiContext, typed: str, values: tuple) -> list[Any]:
    config, problems = form.validate_values(list(values), ctx.specs)
    if config is None:
        return ["Not saved: the config has problems.", None, *_marks(ctx, problems)]
    text = dump_config(config)
    download = Path(tempfile.mkdtemp(prefix="ppsf-config-")) / f"{config.name}.toml"
    download.write_text(text, encoding="utf-8")
    if not (typed or "").strip():
        return [
            f"Saved for download (type a file name to save it in `{ctx.configs_dir}` too).",
            str(download),
            *_marks(ctx, []),
        ]
    path, problem = confined_file(typed, ctx.configs_dir, [ctx.configs_dir], "config file", (".toml",))
    if path is None:
        return ["Not saved.", str(download), *_marks(ctx, [problem])]
    problem = writable_file_problem(path, "config file", suffixes=(".toml",))
    if problem:
        return ["Not saved.", str(download), *_marks(ctx, [problem])]
    atomic_write_text(path, text)  # a rename: replaces a symlink put there meanwhile, never follows it
    return [f"Saved to `{path}`.", str(download), *_marks(ctx, [])]


def _check(ctx: UiContext, values: tuple) -> list[Any]:
    config, problems = form.validate_values(list(values), ctx.specs)
    summary = ""
    if config is not None:
        problems, summary = preflight(config, ctx.runs_dir)
    if not problems:
        return [summary, "**Ready to train.** No problems found.", *_marks(ctx, [])[1:]]
    return [summary, *_marks(ctx, problems)]


def _memory_estimate(ctx: UiContext, vram: float | None, values: tuple) -> list[str]:
    """The estimate of the form's config for the Setup page and beside Start (the same text in both)."""
    config, _ = form.validate_values(list(values), ctx.specs)
    if config is None:
        text = "**Memory estimate:** waits for a valid config (Check lists what to fix)."
    else:
        text = estimate_summary(config, vram_gib=vram or None)
    return [text, text]


# ---------------------------------------------------------------- Dataset tab
def _dataset_tab(ctx: UiContext, setup: SetupTab) -> None:
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


# ---------------------------------------------------------------- Run tab
@dataclass
class RunTab:
    """What the page-load event needs to fill the Run tab."""

    inputs: list[Any]  # current run, change signature, series drawn per plot
    outputs: list[Any]  # what _refresh_run fills
    redraw: Callable[..., Iterator[list[Any]]]
    memory: gr.Markdown  # the Setup form's memory estimate, shown beside Start


def _plots(prefix: str) -> list[gr.LinePlot]:
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


PLOT_TITLES = ("Loss", "Prodigy's d per group", "Applied learning rate d·lr per group")


def _plot_frames(frames: list[pd.DataFrame]) -> list[pd.DataFrame | None]:
    """The snapshot's loss, d and d·lr tables; None for an empty one (an empty table would fix an empty legend)."""
    return [frame if len(frame) else None for frame in frames]


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


def _samples_gallery(elem_id: str) -> gr.Gallery:
    """A gallery of sample images, newest first."""
    return gr.Gallery(
        label="Samples (newest first)",
        columns=8,
        height=280,
        object_fit="contain",
        fit_columns=False,
        elem_id=elem_id,
    )


def _run_tab(ctx: UiContext, setup: SetupTab, current_run: gr.State, refresh_seconds: float) -> RunTab:
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
    memory = gr.Markdown(MEMORY_PENDING, elem_id="run-memory")
    message = gr.Markdown(elem_id="run-message")
    title = gr.Markdown(elem_id="run-title")
    progress = gr.HTML(view.progress_html(view.Progress(0, None, None, None)), elem_id="run-progress")
    status = gr.Markdown(elem_id="run-status")
    plots = _plots("")
    samples = _samples_gallery("samples")
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
    frames = _plot_frames(snap.frames)
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
        return [text, gr.skip(), *_marks(ctx, problems)]
    try:
        run_dir = runner.start_run(config, ctx.allow_parallel_runs)
    except runner.RunnerError as error:
        return [f"**Not started:** {error}", gr.skip(), *_marks(ctx, [])]
    return [f"Started **{run_dir.name}**; the plots fill in as it trains.", str(run_dir), *_marks(ctx, [])]


def _stop(ctx: UiContext, current: str) -> str:
    """Send the run's trainer its stop signal, once (a second one would abort it and lose steps)."""
    run_dir = _current(ctx, current)
    answer = runner.request_stop(run_dir) if run_dir is not None else "not running"
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


# ---------------------------------------------------------------- Runs tab
def _run_names(ctx: UiContext) -> list[str]:
    return [p.name for p in runner.list_run_dirs(ctx.runs_dir)]


def _runs_tab(ctx: UiContext, tab: gr.Tab, tabs: gr.Tabs, current_run: gr.State) -> None:
    refresh = gr.Button("Refresh", elem_id="runs-refresh")
    table = gr.Dataframe(label="Runs", interactive=False, elem_id="runs-table")
    with gr.Row():
        choice = gr.Dropdown(label="Run", choices=[], elem_id="runs-choice", scale=3)
        open_run = gr.Button("Open", elem_id="runs-open", scale=1)
        show = gr.Button("Show on the Run tab", elem_id="runs-show", scale=1)
    summary = gr.Markdown(elem_id="runs-summary")
    plots = _plots("runs-")
    samples = _samples_gallery("runs-samples")
    config = gr.Code(
        label="config.toml", language=None, interactive=False, max_lines=40, elem_id="runs-config"
    )

    def listing() -> list[Any]:
        names = _run_names(ctx)
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
        view.progress(snap.events).text(),
        f"final d: {view.format_d(summary['final_d']) or 'n/a'} · samples: {summary['samples']}",
    ]
    text += [f"exported: `{p}`" for p in summary["exported"]]
    notices = view.notices_markdown(snap.events, snap.state)
    return [
        "\n\n".join(text + ([notices] if notices else [])),
        *_plot_frames(snap.frames),
        view.sample_images(snap.events),
        config_path.read_text(encoding="utf-8") if config_path.is_file() else "(no config.toml yet)",
    ]


def _show_run(ctx: UiContext, name: str | None) -> list[Any]:
    run_dir = resolve_run(ctx.runs_dir, name)
    if run_dir is None:
        return [gr.skip(), gr.skip()]
    return [str(run_dir), gr.Tabs(selected="run")]


# ---------------------------------------------------------------- Export tab
def _export_tab(ctx: UiContext, tab: gr.Tab) -> None:
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
    export = gr.Button("Export", variant="primary", elem_id="export")
    result = gr.Markdown(elem_id="export-result")
    files = gr.File(label="Files", file_count="multiple", interactive=False, elem_id="export-files")
    metadata = gr.JSON(label="Metadata", elem_id="export-metadata")

    def runs() -> Any:
        names = _run_names(ctx)
        return gr.Dropdown(choices=names, value=names[0] if names else None)

    tab.select(runs, None, run)
    run.change(lambda name: _checkpoints(ctx, name), run, checkpoint)
    export.click(
        lambda name, step, fmts: _export(ctx, name, step, fmts),
        [run, checkpoint, formats],
        [result, files, metadata],
        api_name="export",
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
