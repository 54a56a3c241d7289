"""Everything checked about a validated config before any model loads, for `check`, `train` and the UI alike.

The schema (config.py) checks each value on its own; this module checks the config against the machine:
paths, permissions, installed packages, the model file's header, and the LoRA targets against the model's
architecture, built from its config json on the `meta` device (no weights are read). Problems stop a run;
warnings are printed and logged, and the run goes on.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, get_args

from trainers.atomic import atomic_write_text
from trainers.config import DEMO_SCHEME, ConfigError, ModelConfig, TrainConfig, load_config
from trainers.paths import CACHE_FOLDER, DEMO_DATASETS, DEMO_MODELS

SINGLE_FILE_SUFFIXES = (".safetensors", ".sft")
_EXPORT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
# Layer types peft can put a LoRA on (by their class names, so torch need not be imported to list them).
_LORA_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding")


def load_checked(path: Path, overrides: list[str] | None = None) -> TrainConfig:
    """`load_config`, whose schema errors come together with the problems of the model and dataset paths
    (a typo elsewhere must not hide a wrong path: every problem in one report)."""
    try:
        return load_config(path, overrides)
    except ConfigError as error:
        extra = [p for p in raw_path_problems(error.data) if p not in error.problems]
        if not extra:
            raise
        raise ConfigError([*error.problems, *extra], data=error.data) from None


def config_problems(config: TrainConfig) -> list[str]:
    """Every problem that would stop this config's run, one "field: message" line each; [] means ready."""
    problems = path_problems(config)
    model_is_usable = not any(problem.startswith("model.path") for problem in problems)
    problems += _missing_packages(config) + _write_problems(config) + _empty_target_problems(config)
    problems += _validation_problems(config)
    if model_is_usable:  # the architecture is only looked at in a model known to be the right kind
        problems += _target_problems(config)
    return problems


def check_config(config: TrainConfig) -> tuple[list[str], str]:
    """(problems, dataset summary) found without loading a model; no problems means ready to train."""
    from trainers.dataset import DatasetError, assign_buckets, bucket_summary, crop_warnings, scan_dataset
    from trainers.paths import resolve_dataset_path
    from trainers.validation_images import check_validation

    problems = config_problems(config)
    if any(problem.startswith("dataset.path") for problem in problems):
        return problems, ""
    try:  # the dataset's own problems are reported along with the config's
        scan = scan_dataset(resolve_dataset_path(config.dataset.path), config.dataset.caption_extension)
    except DatasetError as error:
        return [*problems, f"dataset.path: {error}"], ""
    if problems:
        return problems, ""
    validation_problems, validation_line = check_validation(config.dataset, scan.items)
    if validation_problems:
        return validation_problems, ""
    dataset = config.dataset
    buckets = assign_buckets(scan.items, dataset.resolution, dataset.max_aspect, dataset.no_upscale)
    lines = [f"{len(scan.items)} images, {scan.num_samples} samples per epoch", bucket_summary(buckets)]
    lines += [f"skipped {path}: {reason}" for path, reason in scan.skipped]
    lines += [
        f"warning: {message}"
        for message in scan.warnings + crop_warnings(scan.items, buckets, dataset.max_aspect)
    ]
    if scan.missing_captions:
        lines.append(f"{len(scan.missing_captions)} images have no caption (trigger word only)")
    lines += [f"warning: {message}" for message in config_warnings(config)]
    return [], "\n".join(lines + ([validation_line] if validation_line else []))


def config_warnings(config: TrainConfig) -> list[str]:
    """What is allowed but probably not meant (a path read as local, an oversized rank), one line each."""
    warnings = []
    note = _local_model_note(config.model.path)
    if note:
        warnings.append(note)
    warnings += _rank_warnings(config)
    return warnings


# ---------------------------------------------------------------- paths
def path_problems(config: TrainConfig) -> list[str]:
    """Missing or wrong paths, one message per problem, without loading anything."""
    return _path_problems(config.model.path, config.model.family, config.dataset.path)


def raw_path_problems(data: dict[str, Any] | None) -> list[str]:
    """The path problems of a config that failed validation, from the values that are there."""
    if not isinstance(data, dict):
        return []
    model, dataset = data.get("model"), data.get("dataset")
    model_path = model.get("path") if isinstance(model, dict) else None
    family = model.get("family", "sdxl") if isinstance(model, dict) else "sdxl"
    dataset_path = dataset.get("path") if isinstance(dataset, dict) else None
    if family not in get_args(ModelConfig.model_fields["family"].annotation):  # the schema's error names it
        family = ModelConfig.model_fields["family"].default
    problems = []
    if isinstance(model_path, str):
        problems += [p for p in _path_problems(model_path, family, "demo://shapes") if p.startswith("model.")]
    if isinstance(dataset_path, str):
        problems += [
            p for p in _path_problems("demo://tiny-sdxl", family, dataset_path) if p.startswith("dataset.")
        ]
    return problems


def shown_path(path: Path) -> str:
    """A path as the message shows it: a relative one with the folder it is read from (the current one)."""
    if path.is_absolute():
        return str(path)
    return f"{path} (relative to the current folder {Path.cwd()}: {Path.cwd() / path})"


def _path_problems(model: str, family: str, dataset: str) -> list[str]:
    problems = []
    if model.startswith(DEMO_SCHEME):
        if model.removeprefix(DEMO_SCHEME) not in DEMO_MODELS:
            available = ", ".join(DEMO_SCHEME + name for name in sorted(DEMO_MODELS))
            problems.append(f"model.path: unknown demo model {model!r}; available: {available}")
    else:
        problems.extend(_model_path_problems(model, family))
    if dataset.startswith(DEMO_SCHEME):
        if dataset.removeprefix(DEMO_SCHEME) not in DEMO_DATASETS:
            problems.append(f"dataset.path: unknown demo dataset {dataset!r}; available: demo://shapes")
    else:
        folder = Path(dataset).expanduser()
        if not folder.exists():
            problems.append(f"dataset.path: {shown_path(folder)} does not exist")
        elif not folder.is_dir():
            problems.append(
                f"dataset.path: {shown_path(folder)} is a file; give the folder that holds the images"
            )
    return problems


def _validation_problems(config: TrainConfig) -> list[str]:
    """A validation folder that is missing or is the training folder; validation steps with nothing to
    validate on."""
    source = config.dataset.validation
    if source is None:
        if config.validation.every_n_steps:
            return [
                "validation.every_n_steps: there are no validation images; set dataset.validation to a "
                "folder, or to a fraction of the dataset to hold out (e.g. 0.1)"
            ]
        return []
    if not isinstance(source, str):
        return []
    if source.startswith(DEMO_SCHEME):
        if source == config.dataset.path or source.removeprefix(DEMO_SCHEME) not in DEMO_DATASETS:
            others = ", ".join(DEMO_SCHEME + n for n in sorted(DEMO_DATASETS) if DEMO_SCHEME + n != source)
            return [
                f"dataset.validation: {source} is not a demo validation set; use {others}, a folder or a fraction"
            ]
        return []
    folder = Path(source).expanduser()
    if not folder.exists():
        return [
            f"dataset.validation: {folder} does not exist; give a folder of validation images, or a "
            "fraction of the dataset to hold out written as a number (e.g. 0.1, without quotes)"
        ]
    if not folder.is_dir():
        return [f"dataset.validation: {folder} is a file; give the folder that holds the validation images"]
    dataset = config.dataset.path
    if not dataset.startswith(DEMO_SCHEME) and folder.resolve() == Path(dataset).expanduser().resolve():
        return [
            "dataset.validation: is the training folder itself, so the loss would be measured on trained "
            "images; give a separate folder, or a fraction to hold out (e.g. 0.1)"
        ]
    return []


def _model_path_problems(model: str, family: str) -> list[str]:
    path = Path(model).expanduser()
    looks_local = (
        model.endswith((*SINGLE_FILE_SUFFIXES, ".ckpt"))
        or model.startswith((".", "/", "~"))
        or (os.sep in model and model.count("/") != 1)
    )
    if path.exists():  # an existing local path is always taken as local, even if it looks like a repo id
        if path.is_dir() and not (path / "model_index.json").is_file():
            return [
                f"model.path: {path} is a folder without model_index.json (not a diffusers pipeline folder)"
            ]
        if path.is_file() and path.suffix == ".ckpt":
            return [f"model.path: {path} is a .ckpt (pickle) file; convert it to .safetensors first"]
        if path.is_file():
            problem = _checkpoint_problem(path, family)
            return [problem] if problem else []
        return []
    if looks_local:
        return [f"model.path: {shown_path(path)} does not exist"]
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
            return [
                f"model.path: {model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                "download it first or give a local folder"
            ]
    return []


def _local_model_note(model: str) -> str | None:
    """Say so when a path that could be a Hub repo id ("org/name") is read as the local folder it names."""
    if model.startswith((DEMO_SCHEME, ".", "/", "~")) or model.count("/") != 1:
        return None
    path = Path(model)
    if not path.exists():
        return None
    return (
        f"model.path: {model!r} is read as the local {'folder' if path.is_dir() else 'file'} "
        f"{path.resolve()}, not as the Hugging Face repo of that name (write ./{model} to make that plain)"
    )


def _checkpoint_problem(path: Path, family: str) -> str | None:
    """Why a single model file is not a `family` safetensors model, from its header alone (no weights)."""
    from safetensors import safe_open

    from trainers.models.families import family_for

    try:
        # parses the JSON header only; numpy, not pt: the same checks without importing torch
        with safe_open(str(path), framework="numpy") as file:
            keys = list(file.keys())
    except Exception as error:  # SafetensorError, OSError...: the header is not a safetensors one
        return (
            f"model.path: {path} is not a safetensors file ({type(error).__name__}: {error}); give "
            f"{family_for(family).model_file_hint} or a diffusers folder"
        )
    return family_for(family).check_model_file(path, keys)


# ---------------------------------------------------------------- packages and permissions
def _missing_packages(config: TrainConfig) -> list[str]:
    if config.training.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return [
                "training.tensorboard: the tensorboard package is not installed (pip install tensorboard)"
            ]
    return []


def _nearest_existing(path: Path) -> Path:
    """`path` itself or the closest folder above it that exists (where a write would have to happen)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(path: Path) -> bool:
    """Whether files can be created at `path` (or, where it does not exist yet, in the folder above)."""
    existing = _nearest_existing(path)
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


def _write_problems(config: TrainConfig) -> list[str]:
    problems = []
    run_dir = Path(config.output_dir).expanduser() / config.name
    if not _writable(run_dir):
        problems.append(
            f"output_dir: {_nearest_existing(run_dir)} cannot be written (read-only or not a folder), so the "
            f"run folder {shown_path(run_dir)} cannot be made; choose a writable output_dir"
        )
    dataset = config.dataset
    if not (dataset.cache_latents or dataset.cache_text_embeddings):
        return problems
    if dataset.cache_dir:
        cache = Path(dataset.cache_dir).expanduser()
        if not _writable(cache):
            problems.append(
                f"dataset.cache_dir: {_nearest_existing(cache)} cannot be written (read-only or not a "
                "folder); choose a writable folder, or turn dataset.cache_latents and "
                "dataset.cache_text_embeddings off"
            )
        return problems
    root = Path(dataset.path).expanduser()
    if not dataset.path.startswith(DEMO_SCHEME) and root.is_dir() and not _writable(root / CACHE_FOLDER):
        problems.append(
            f"dataset.path: {root} is read-only, so the latent and text caches cannot be written in it; set "
            "dataset.cache_dir to a writable folder, or turn dataset.cache_latents and "
            "dataset.cache_text_embeddings off"
        )
    return problems


# ---------------------------------------------------------------- LoRA targets against the architecture
def _target_lists(config: TrainConfig) -> list[tuple[str, str, list[str]]]:
    """(config field, component, module names) of each component whose LoRA targets are checked."""
    from trainers.models.families import family_for

    return family_for(config.model.family).lora_target_lists(config)


def _empty_target_problems(config: TrainConfig) -> list[str]:
    problems = {}
    for field, _, names in _target_lists(config):
        if not [name for name in names if name.strip()]:
            section, key = field.split(".")
            default = type(getattr(config, section)).model_fields[key].get_default(call_default_factory=True)
            problems[f"{field}: empty, so nothing would train; name the layers, e.g. {default}"] = None
    return list(problems)


def _target_problems(config: TrainConfig) -> list[str]:
    problems = {}
    for field, component, names in _target_lists(config):
        layers = _lora_layers(config.model.family, config.model.path, component)
        if layers is None:
            continue  # no architecture config without weights (a single file, a repo not in the cache)
        for name in names:
            if name.strip() and not _matching_layers([name], layers):
                problems[_unmatched_message(field, component, name, layers)] = None
    return list(problems)


def _unmatched_message(field: str, component: str, name: str, layers: dict[str, tuple[int, int]]) -> str:
    inside = sorted(
        {key.split(f"{name}.", 1)[1] for key in layers if key.startswith(f"{name}.") or f".{name}." in key}
    )
    if inside:  # peft only puts LoRAs on layers, not on the blocks that hold them
        examples = ", ".join(repr(layer) for layer in inside[:4])
        return (
            f"{field}: {name!r} matches no layer a LoRA can go on in the {component}; it is a block, not a "
            f"layer; name its layers instead, e.g. {examples}"
        )
    candidates = {".".join(key.split(".")[-depth:]) for key in layers for depth in (1, 2)}
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "see the model's layer names"
    return f"{field}: {name!r} matches no layer a LoRA can go on in the {component}; {hint}"


def _matching_layers(names: list[str], layers: dict[str, tuple[int, int]]) -> list[str]:
    """Layer names peft would give a LoRA for `names`: peft's rule for a list of target names
    (`check_target_module_exists`: the full name, or a name ending in "." + target), written out here so
    that `check` need not import peft (seconds); tests/test_cli_startup.py holds it to peft's."""
    targets = set(names)
    return [key for key in layers if key in targets or any(key.endswith(f".{name}") for name in targets)]


def _rank_warnings(config: TrainConfig) -> list[str]:
    """A warning when the rank exceeds what targeted layers can use (min(fan_in, fan_out) each)."""
    rank = config.lora.rank
    per_layer = []  # (full rank, LoRA parameters) of every targeted layer
    for _, component, names in _target_lists(config):
        layers = _lora_layers(config.model.family, config.model.path, component)
        if layers is None:
            return []
        for key in _matching_layers([n for n in names if n.strip()], layers):
            fan_in, fan_out = layers[key]
            per_layer.append((min(fan_in, fan_out), rank * (fan_in + fan_out)))
    over = [full for full, _ in per_layer if rank > full]
    if not over:
        return []
    dtype = config.saving.dtype
    megabytes = sum(params for _, params in per_layer) * _EXPORT_BYTES[dtype] / 2**20
    return [
        f"lora.rank: {rank} is more than the full rank of {len(over)} of the {len(per_layer)} targeted layers "
        f"(their full rank is at most {max(over)}), so those learn nothing a smaller rank could not; the LoRA "
        f"would be {megabytes:.1f} MB in {dtype}. Lower lora.rank (e.g. {min(full for full, _ in per_layer)})"
    ]


def _lora_layers(family: str, model_path: str, component: str) -> dict[str, tuple[int, int]] | None:
    """{layer name: (fan_in, fan_out)} of the LoRA-able layers of a component, or None without a config."""
    source = _architecture_source(family, model_path, component)
    if source is None:
        return None
    return _layers_of(family, component, json.dumps(source, sort_keys=True))


def _architecture_source(family: str, model_path: str, component: str) -> dict[str, Any] | None:
    """The component's config dict: the demo model's, a local diffusers folder's, or a cached Hub repo's."""
    from trainers.models.families import family_for

    if model_path.startswith(DEMO_SCHEME):
        return family_for(family).component_config(model_path, component)
    local = Path(model_path).expanduser()
    if local.is_file():
        return None  # a single file has no config json; its keys are checked by _checkpoint_problem
    if local.is_dir():
        config_file: Any = local / component / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        config_file = try_to_load_from_cache(model_path, f"{component}/config.json")
        if not isinstance(config_file, str):
            return None
    try:
        return json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # a missing or broken config is the loader's to report


@functools.lru_cache(maxsize=8)
def _layers_of(family: str, component: str, config_json: str) -> dict[str, tuple[int, int]]:
    """The component's LoRA-able layers: from the layer cache, else built on the meta device (importing
    diffusers or transformers takes seconds, so a table is built once per architecture and kept)."""
    path = layer_cache_dir() / f"{_layer_key(family, component, config_json)}.json"
    try:
        return {
            name: (int(a), int(b)) for name, (a, b) in json.loads(path.read_text(encoding="utf-8")).items()
        }
    except (OSError, ValueError, TypeError):
        pass  # not cached yet, or a damaged file: build it again
    layers = _build_layers(family, component, config_json)
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
        atomic_write_text(path, json.dumps(layers))
    return layers


def layer_cache_dir() -> Path:
    """Where layer tables are kept (PPSF_LAYER_CACHE, else ~/.cache/ppsf-trainer/layers)."""
    default = Path.home() / ".cache" / "ppsf-trainer" / "layers"
    return Path(os.environ.get("PPSF_LAYER_CACHE", default))


def _layer_key(family: str, component: str, config_json: str) -> str:
    """What a layer table depends on: the architecture's config and the libraries that build it."""
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for package in ("diffusers", "transformers"):
        try:
            versions.append(version(package))
        except PackageNotFoundError:
            versions.append("")
    key = json.dumps([family, component, config_json, versions])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def _build_layers(family: str, component: str, config_json: str) -> dict[str, tuple[int, int]]:
    """Build the component on the meta device (shapes only, no memory) and list its LoRA-able layers."""
    import torch

    from trainers.models.families import family_for

    with torch.device("meta"):
        model = family_for(family).meta_component(component, json.loads(config_json))
    layers = {}
    for name, module in model.named_modules():
        if type(module).__name__ not in _LORA_LAYERS:
            continue
        weight = module.weight
        fan_in = weight[0].numel() if weight.dim() > 1 else weight.shape[0]
        layers[name] = (int(fan_in), int(weight.shape[0]))
    return layers


# ---------------------------------------------------------------- several processes
def distributed_problems(config: TrainConfig, processes: int, micro_batches_per_step: int) -> list[str]:
    """What stops this config on `processes` processes taking `micro_batches_per_step` micro-batches per
    step over all of them (trainers.distributed.micro_batches_per_step: a resumed run keeps its own)."""
    per_process = micro_batches_per_step // max(1, processes)
    if config.optimizer.fused_back_pass and per_process > 1:
        return [
            f"optimizer.fused_back_pass: this run takes {micro_batches_per_step} micro-batches per step, so on "
            f"{processes} process(es) each would accumulate {per_process} of them, which the fused backward "
            f"pass cannot do; resume it on {micro_batches_per_step} processes, or set "
            "optimizer.fused_back_pass = false in the run's config.toml"
        ]
    return []
