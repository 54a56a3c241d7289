"""Turning the config's model and dataset paths into real ones (trainers/checks.py checks them)."""

from __future__ import annotations

import os
from pathlib import Path

from trainers.config import DEMO_SCHEME

DEMO_MODELS = {"tiny-sdxl"}
DEMO_DATASETS = {"shapes"}


def demo_root() -> Path:
    """Where demo:// models and datasets are generated (PPSF_DEMO_DIR, else ~/.cache/ppsf-trainer/demo)."""
    return Path(os.environ.get("PPSF_DEMO_DIR", Path.home() / ".cache" / "ppsf-trainer" / "demo"))


def resolve_model_path(path: str) -> str:
    """demo://tiny-sdxl is built on first use; an existing local path becomes absolute, so no loader can
    take a relative "models/sdxl" for a Hub repo id; anything else (a repo id) is returned as given."""
    if not path.startswith(DEMO_SCHEME):
        local = Path(path).expanduser()
        return str(local.resolve()) if local.exists() else path
    from trainers.tiny_models import build_tiny_sdxl

    return str(build_tiny_sdxl(demo_root() / path.removeprefix(DEMO_SCHEME)))


def resolve_dataset_path(path: str) -> Path:
    """demo://shapes is generated on first use; anything else is returned as a Path."""
    if not path.startswith(DEMO_SCHEME):
        return Path(path).expanduser()
    from trainers.tiny_models import write_demo_dataset

    return write_demo_dataset(demo_root() / path.removeprefix(DEMO_SCHEME))
