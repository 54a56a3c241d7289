"""The Setup page: the config form built from the schema, presets and config files, Check, the memory estimate.

The form's widgets (SetupTab) are what the Run page starts and the Dataset page scans.
"""

from __future__ import annotations

import hashlib
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from app import config_form as form
from app import runner
from app.pages.common import MEMORY_PENDING, UiContext, marks
from app.path_checks import confined_file, file_problem, writable_file_problem
from app.preflight import preflight
from trainers.atomic import atomic_write_text
from trainers.config import dump_config
from trainers.memory import estimate_summary

DEFAULT_PRESET = "demo"
FIELDS_PER_ROW = 3
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


# What a user decides on the first screen; the rest of the schema sits below in collapsed sections.
ESSENTIALS = (
    "model.family",
    "model.path",
    "dataset.path",
    "dataset.trigger_word",
    "name",
    "training.max_steps",
)


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
    gpus: gr.Number  # how many GPUs Start and Resume use (shown only where there are two or more)
    start: gr.Button  # starts the form's config (wired by the Run page, which shows the run)
    name: Any  # the run name's widget (Start may propose a free name in it)

    def by_key(self, specs: list[form.FieldSpec], key: str) -> Any:
        """The widget of a dotted config key."""
        return self.fields[[s.key for s in specs].index(key)]

    @property
    def marks(self) -> list[Any]:
        """The outputs that marks() fills: overall problems, each section's problems, each accordion."""
        return [self.problems, *self.section_problems, *self.accordions]


def build(ctx: UiContext) -> SetupTab:
    presets = form.list_presets(ctx.presets_dir)
    first = DEFAULT_PRESET if DEFAULT_PRESET in presets else next(iter(presets), None)
    initial = dict(zip([s.key for s in ctx.specs], preset_values(ctx, first)))
    widgets: dict[str, Any] = {}

    def add(spec: form.FieldSpec) -> None:
        widgets[spec.key] = _field_widget(spec, initial[spec.key])

    by_key = {spec.key: spec for spec in ctx.specs}
    with gr.Row(equal_height=True):
        preset = gr.Dropdown(
            choices=list(presets), value=first, label="Preset",
            info="Ready configs from the presets folder.", elem_id="preset", scale=3,
        )  # fmt: skip
        load_preset = gr.Button("Load preset", elem_id="load-preset", scale=1)
    for start in range(0, len(ESSENTIALS), FIELDS_PER_ROW):
        with gr.Row(equal_height=True):
            for key in ESSENTIALS[start : start + FIELDS_PER_ROW]:
                add(by_key[key])
    with gr.Row(equal_height=True):
        vram = gr.Number(
            None,
            label="GPU memory (GB)",
            info="Empty: the GPU here, if any. The estimate says whether the config fits it.",
            minimum=0,
            elem_id="vram",
            scale=1,
        )
        gpus = gr.Number(
            1,
            label="GPUs",
            info=f"Processes, one per GPU ({ctx.gpus_present} here); training.batch_size is per GPU.",
            minimum=1,
            maximum=max(ctx.gpus_present, 1),
            precision=0,
            visible=ctx.gpus_present > 1,
            elem_id="gpus",
            scale=1,
        )
        memory = gr.Markdown(MEMORY_PENDING, elem_id="setup-memory")
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="setup-start", scale=2)
        check = gr.Button("Check", elem_id="check", scale=1)
    message = gr.Markdown(elem_id="setup-message")
    problems = gr.Markdown(elem_id="setup-problems")
    summary = gr.Textbox(
        label="Dataset summary", lines=3, interactive=False, visible=False, elem_id="check-summary"
    )

    section_mds, accordions = [], []
    for section, title in form.SECTIONS:
        specs = [s for s in ctx.specs if s.section == section and s.key not in ESSENTIALS]
        with gr.Accordion(f"{title} settings", open=False, elem_id=f"section-{section}") as acc:
            section_mds.append(
                gr.Markdown(visible=False, elem_id=f"problems-{section}", elem_classes="section-problems")
            )
            if section == "optimizer":
                gr.Markdown(OPTIMIZER_HELP, elem_id="optimizer-help")
            for begin in range(0, len(specs), FIELDS_PER_ROW):
                with gr.Row(equal_height=True):
                    for spec in specs[begin : begin + FIELDS_PER_ROW]:
                        add(spec)
        accordions.append(acc)
    with gr.Accordion("Config files: load, save, upload", open=False, elem_id="section-files"):
        with gr.Row(equal_height=True):
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
                label="…or upload a TOML", file_types=[".toml"], type="filepath", height=110,
                elem_id="upload-toml",
            )  # fmt: skip
            download = gr.File(label="Saved config", interactive=False, height=110, elem_id="download-toml")
    fields = [widgets[spec.key] for spec in ctx.specs]
    saved_form = gr.BrowserState(
        None, storage_key=_form_storage_key(ctx), secret=browser_secret(ctx.runs_dir)
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
        gpus=gpus,
        start=start,
        name=widgets["name"],
    )
    loaded = [*fields, message, *tab.marks]
    load_preset.click(lambda name: _load_preset(ctx, name), preset, loaded, api_name="load_preset")
    load_file.click(lambda path: _load_file(ctx, path), toml_path, loaded, api_name="load_file")
    upload.upload(lambda path: _load_upload(ctx, path), upload, loaded, api_name="upload_config")
    save_file.click(
        lambda path, *values: _save_file(ctx, path, values),
        [toml_path, *fields],
        [message, download, *tab.marks],
        api_name="save_file",
    )
    check.click(
        lambda *values: _check(ctx, values), fields, [summary, tab.name, *tab.marks], api_name="check"
    )
    return tab


BROWSER_SECRET_FILE = ".ui-browser-secret"


def browser_secret(runs_dir: Path) -> str:
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


def restore_form(ctx: UiContext, saved: Any) -> list[Any]:
    """Updates putting back the form this browser kept (skips when it kept none)."""
    values = form.restorable_values(saved, ctx.specs)
    if not values:
        return [gr.skip()] * (len(ctx.specs) + 1)
    fields = [values[spec.key] if spec.key in values else gr.skip() for spec in ctx.specs]
    return [*fields, "Restored the form as this browser last had it (its edits are kept as you type)."]


def _field_widget(spec: form.FieldSpec, value: Any) -> Any:
    common = {"label": spec.label, "info": spec.hint, "elem_id": spec.elem_id, "value": value}
    if spec.key == "output_dir":
        return gr.Textbox(
            **{**common, "info": "The runs folder of this UI (set with --runs-dir). Config key: output_dir"},
            interactive=False,
        )
    if spec.kind == "checkbox":
        return gr.Checkbox(**common)
    if spec.kind == "dropdown":
        return gr.Dropdown(choices=list(spec.choices), **common)
    if spec.kind == "choices":
        return gr.CheckboxGroup(choices=list(spec.choices), **common)
    if spec.kind == "set_or_list":
        return gr.Dropdown(choices=list(spec.choices), allow_custom_value=True, **common)
    if spec.kind == "number":
        return gr.Number(precision=0 if spec.integer else None, **common)
    if spec.kind == "optional_number":
        return gr.Textbox(placeholder="not set", **common)
    if spec.kind == "lines":
        return gr.Textbox(lines=3, **common)
    return gr.Textbox(**common)


def preset_values(ctx: UiContext, name: str | None) -> list[Any]:
    data: dict[str, Any] = {}
    if name:
        data, _ = form.read_toml(form.list_presets(ctx.presets_dir)[name])
    return form.values_from_config(_in_runs_dir(ctx, data), ctx.specs)


def _in_runs_dir(ctx: UiContext, data: dict[str, Any]) -> dict[str, Any]:
    """The config with output_dir set to this UI's runs folder (the only one it manages)."""
    return {**data, "output_dir": str(ctx.runs_dir)}


def _load_data(ctx: UiContext, data: dict[str, Any], source: str) -> list[Any]:
    data = _in_runs_dir(ctx, data)
    _, problems = form.validate_dict(data)
    values = form.values_from_config(data, ctx.specs)
    note = f"Loaded {source}." + (" It has problems, listed below." if problems else "")
    index = [spec.key for spec in ctx.specs].index("name")
    name = values[index]
    if isinstance(name, str) and name.strip() and Path(name).name == name:
        free = runner.free_run_name(ctx.runs_dir, name)
        if free != name:
            values[index] = free
            note += f" `{name}` already holds a run, so this one is named **{free}** (change it if you like)."
    return [*values, note, *marks(ctx, problems)]


def _unchanged_fields(ctx: UiContext, message: str, problems: list[str]) -> list[Any]:
    return [*[gr.skip()] * len(ctx.specs), message, *marks(ctx, problems)]


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
        return ["Not saved: the config has problems.", None, *marks(ctx, problems)]
    text = dump_config(config)
    download = Path(tempfile.mkdtemp(prefix="ppsf-config-")) / f"{config.name}.toml"
    download.write_text(text, encoding="utf-8")
    if not (typed or "").strip():
        return [
            f"Saved for download (type a file name to save it in `{ctx.configs_dir}` too).",
            str(download),
            *marks(ctx, []),
        ]
    path, problem = confined_file(typed, ctx.configs_dir, [ctx.configs_dir], "config file", (".toml",))
    if path is None:
        return ["Not saved.", str(download), *marks(ctx, [problem])]
    problem = writable_file_problem(path, "config file", suffixes=(".toml",))
    if problem:
        return ["Not saved.", str(download), *marks(ctx, [problem])]
    atomic_write_text(path, text)  # a rename: replaces a symlink put there meanwhile, never follows it
    return [f"Saved to `{path}`.", str(download), *marks(ctx, [])]


def _check(ctx: UiContext, values: tuple) -> list[Any]:
    """Updates for the dataset summary, the name (a free one if the name is taken) and the problem marks."""
    config, problems = form.validate_values(list(values), ctx.specs)
    summary, name, note = "", gr.skip(), ""
    if config is not None:
        renamed, note = runner.with_free_name(config)
        name = renamed.name if note else gr.skip()
        problems, summary = preflight(renamed, ctx.runs_dir)
    summary_box = gr.Textbox(value=summary, visible=bool(summary))
    if not problems:
        ready = "**Ready to train.** No problems found." + (f" {note}" if note else "")
        return [summary_box, name, ready, *marks(ctx, [])[1:]]
    return [summary_box, name, *marks(ctx, problems)]


def memory_estimate(ctx: UiContext, vram: float | None, values: tuple) -> list[str]:
    """The estimate of the form's config for the Setup page and beside Start (the same text in both)."""
    config, _ = form.validate_values(list(values), ctx.specs)
    if config is None:
        text = "**Memory estimate:** waits for a valid config (Check lists what to fix)."
    else:
        text = compact_estimate(estimate_summary(config, vram_gib=vram or None))
    return [text, text]


def compact_estimate(summary: str) -> str:
    """The estimate's peak and verdict first, its per-part table folded away (it would push Start down)."""
    lines = summary.split("\n")
    table = [line for line in lines if line.startswith("|")]
    if not table:
        return summary
    words = [line for line in lines if line.strip() and not line.startswith("|")]
    details = "\n".join(["<details><summary>Where the memory goes</summary>", "", *table, "", "</details>"])
    return "\n\n".join([*words, details])
