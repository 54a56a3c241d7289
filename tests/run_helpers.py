"""Shared set-up of the tests that train the tiny SDXL or read run folders: config builders, run folders and
UI contexts. Only the standard library at import: test_distributed.py runs as a torch-only worker script."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The tiny-SDXL run most tests start from; a test file's own defaults and a test's sections go over it.
BASE_SECTIONS: dict = {
    "lora": {"rank": 4, "alpha": 8},
    "training": {"max_steps": 12, "batch_size": 2, "precision": "fp32", "seed": 7},
    "optimizer": {"d0": 1e-4},
    "sampling": {"prompts": [], "steps": 2},
    "saving": {"every_n_steps": 0, "keep_last": 5, "formats": ["diffusers"], "dtype": "fp32"},
}


def merge_sections(data: dict, sections: dict) -> dict:
    """Update `data`'s sections key by key with `sections`' dicts; a value that is not a dict replaces."""
    for section, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(section, {}).update(copy.deepcopy(values))
        else:
            data[section] = copy.deepcopy(values)
    return data


def config_builder(**defaults: dict) -> Callable[..., dict]:
    """A `make_config(tmp_path, model_path, dataset_path, **sections)` giving a raw config dict: a run named
    "run" in tmp_path/runs, the dataset at 64 px with trigger word "shapes", BASE_SECTIONS, then `defaults`
    (the test file's), then `sections` (the test's)."""

    def make_config(tmp_path: Path, model_path: Path, dataset_path: Path, **sections) -> dict:
        data = {
            "name": "run",
            "output_dir": str(tmp_path / "runs"),
            "model": {"path": str(model_path)},
            "dataset": {"path": str(dataset_path), "resolution": 64, "trigger_word": "shapes"},
        }
        merge_sections(data, BASE_SECTIONS)
        merge_sections(data, defaults)
        return merge_sections(data, sections)

    return make_config


def write_run_folder(run_dir: Path, events: list[dict], config: str | None = None) -> Path:
    """A run folder as a trainer leaves it: events.jsonl with `events`, and config.toml if given."""
    run_dir.mkdir(parents=True)
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    if config is not None:
        (run_dir / "config.toml").write_text(config, encoding="utf-8")
    return run_dir


def ui_context(tmp_path: Path, **folders: Path):
    """The UI's context over tmp_path's runs/ and configs/ (plus `folders`), the repository's presets."""
    from app.pages.common import UiContext  # imported here: the trainer tests need no UI

    return UiContext(
        runs_dir=tmp_path / "runs",
        presets_dir=REPO / "presets",
        allow_parallel_runs=False,
        configs_dir=tmp_path / "configs",
        **folders,
    )
