"""Turning the config's model and dataset paths into real ones, and checking them before any model loads."""

from __future__ import annotations

import os
from pathlib import Path

from trainers.config import DEMO_SCHEME, TrainConfig

DEMO_MODELS = {"tiny-sdxl"}
DEMO_DATASETS = {"shapes"}


def demo_root() -> Path:
    """Where demo:// models and datasets are generated (PPSF_DEMO_DIR, else ~/.cache/ppsf-trainer/demo)."""
    return Path(os.environ.get("PPSF_DEMO_DIR", Path.home() / ".cache" / "ppsf-trainer" / "demo"))


def resolve_model_path(path: str) -> str:
    """demo://tiny-sdxl is built on first use; anything else is returned as given."""
    if not path.startswith(DEMO_SCHEME):
        return os.path.expanduser(path)
    from trainers.tiny_models import build_tiny_sdxl

    return str(build_tiny_sdxl(demo_root() / path.removeprefix(DEMO_SCHEME)))


def resolve_dataset_path(path: str) -> Path:
    """demo://shapes is generated on first use; anything else is returned as a Path."""
    if not path.startswith(DEMO_SCHEME):
        return Path(path).expanduser()
    from trainers.tiny_models import write_demo_dataset

    return write_demo_dataset(demo_root() / path.removeprefix(DEMO_SCHEME))


def path_problems(config: TrainConfig) -> list[str]:
    """Missing or wrong paths, one message per problem, without loading anything."""
    problems = []
    model = config.model.path
    if model.startswith(DEMO_SCHEME):
        if model.removeprefix(DEMO_SCHEME) not in DEMO_MODELS:
            problems.append(f"model.path: unknown demo model {model!r}; available: demo://tiny-sdxl")
    else:
        problems.extend(_model_path_problems(model))
    dataset = config.dataset.path
    if dataset.startswith(DEMO_SCHEME):
        if dataset.removeprefix(DEMO_SCHEME) not in DEMO_DATASETS:
            problems.append(f"dataset.path: unknown demo dataset {dataset!r}; available: demo://shapes")
    else:
        folder = Path(dataset).expanduser()
        if not folder.exists():
            problems.append(f"dataset.path: {folder} does not exist")
        elif not folder.is_dir():
            problems.append(f"dataset.path: {folder} is a file; give the folder that holds the images")
    return problems


def _model_path_problems(model: str) -> list[str]:
    path = Path(model).expanduser()
    looks_local = (
        model.endswith((".safetensors", ".ckpt", ".sft"))
        or model.startswith((".", "/", "~"))
        or (os.sep in model and model.count("/") != 1)
    )
    if path.exists():
        if path.is_dir() and not (path / "model_index.json").is_file():
            return [
                f"model.path: {path} is a folder without model_index.json (not a diffusers pipeline folder)"
            ]
        if path.is_file() and path.suffix == ".ckpt":
            return [f"model.path: {path} is a .ckpt (pickle) file; convert it to .safetensors first"]
        return []
    if looks_local:
        return [f"model.path: {path} does not exist"]
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
            return [
                f"model.path: {model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                "download it first or give a local folder"
            ]
    return []
