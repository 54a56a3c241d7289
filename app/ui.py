"""The Gradio Blocks: the Setup, Dataset, Run, Runs and Export pages (app.pages.*) assembled into tabs.

Handlers only translate between widgets and app.* functions; the run folder holds all run state,
so a page reload or a UI restart shows the same thing.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app import runner
from app.dataset_files import default_datasets_dir
from app.pages import dataset, export, run, runs, setup
from app.pages.common import UiContext

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
REFRESH_SECONDS = 2.0


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
        datasets_dir=default_datasets_dir(runs_path),
        gpus_present=runner.gpu_count(),
    )
    with gr.Blocks(title="ppsf-trainer") as demo:
        gr.Markdown(f"# ppsf-trainer\nLoRA training with Prodigy + ScheduleFree. Runs live in `{runs_path}`.")
        current_run = gr.State("")
        with gr.Tabs() as tabs:
            with gr.Tab("Setup", id="setup"):
                setup_tab = setup.build(ctx)
            with gr.Tab("Dataset", id="dataset"):
                dataset.build(ctx, setup_tab)
            with gr.Tab("Run", id="run"):
                run_tab = run.build(ctx, setup_tab, current_run, tabs, refresh_seconds)
            with gr.Tab("Runs", id="runs") as runs_page:
                runs.build(ctx, runs_page, tabs, current_run)
            with gr.Tab("Export", id="export") as export_page:
                export.build(ctx, export_page)
        # The memory estimate follows the form (bursts of edits collapse into one estimate), from the first
        # page load on: it is one of the figures a user decides on.
        gr.on(
            [demo.load] + [field.change for field in setup_tab.fields] + [setup_tab.vram.change],
            lambda vram, *values: setup.memory_estimate(ctx, vram, values),
            [setup_tab.vram, *setup_tab.fields],
            [setup_tab.memory, run_tab.memory],
            show_progress="hidden",
            api_name="memory_estimate",
            trigger_mode="always_last",
        )
        # A page reloaded (after a UI restart, say) gets back the form this browser last had.
        demo.load(
            lambda saved: setup.restore_form(ctx, saved),
            setup_tab.saved_form,
            [*setup_tab.fields, setup_tab.message],
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
