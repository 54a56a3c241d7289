"""Turning the config's model and dataset paths into real ones (trainers/checks.py checks them)."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from trainers.config import DEMO_SCHEME

CACHE_FOLDER = ".ppsf-cache"  # where the latent and text caches go in the dataset without dataset.cache_dir
DEMO_MODELS = {"tiny-sdxl", "tiny-flux", "tiny-klein"}
# name -> (images, seed): the demo's concept images, and as many others of the same concept held out
# for validation (another seed, so none of them is trained on)
DEMO_DATASETS = {"shapes": (12, 0), "shapes-validation": (4, 1)}


def demo_root() -> Path:
    """Where demo:// models and datasets are generated (PPSF_DEMO_DIR, else ~/.cache/ppsf-trainer/demo)."""
    return Path(os.environ.get("PPSF_DEMO_DIR", Path.home() / ".cache" / "ppsf-trainer" / "demo"))


def resolve_model_path(path: str) -> str:
    """demo://tiny-sdxl, tiny-flux and tiny-klein are built on first use; an existing local path becomes absolute, so no loader can
    take a relative "models/sdxl" for a Hub repo id; anything else (a repo id) is returned as given."""
    if not path.startswith(DEMO_SCHEME):
        local = Path(path).expanduser()
        return str(local.resolve()) if local.exists() else path
    name = path.removeprefix(DEMO_SCHEME)
    return str(_demo_model_builder(name)(demo_root() / name))


def _demo_model_builder(name: str):
    """The function that builds demo model `name` into a folder (imported late: they pull in diffusers).
    Every demo model holds its bundled pretrained weights."""
    if name == "tiny-flux":
        from trainers.tiny_flux import build_tiny_flux

        return partial(build_tiny_flux, pretrained=True)
    if name == "tiny-klein":
        from trainers.tiny_flux import build_tiny_klein

        return partial(build_tiny_klein, pretrained=True)
    from trainers.tiny_models import build_tiny_sdxl

    return build_tiny_sdxl


def resolve_dataset_path(path: str) -> Path:
    """demo://shapes (and demo://shapes-validation) are generated on first use; anything else is returned
    as a Path."""
    if not path.startswith(DEMO_SCHEME):
        return Path(path).expanduser()
    from trainers.tiny_models import write_demo_dataset

    name = path.removeprefix(DEMO_SCHEME)
    images, seed = DEMO_DATASETS[name]
    return write_demo_dataset(demo_root() / name, num_images=images, seed=seed)
