"""Export a run's checkpoint as eval-mode LoRA files, without loading the model.

The checkpoint holds the LoRA at the training point y and the optimizer's z, so the schedule-free average
x = (y - (1 - beta1) z) / beta1 (what `optimizer.eval()` gives) is computed here from the files alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig

from trainers.checkpoint import checkpoint_lora_and_average, list_checkpoints
from trainers.config import TrainConfig, load_config
from trainers.export import LoraComponent
from trainers.export_flux import lora_writer
from trainers.models.base import TORCH_DTYPES

EXPORT_METADATA_FILE = "export_metadata.json"


def eval_mode_lora_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's LoRA at the averaged point x, keyed "<component>.<parameter name>".

    Raises ValueError naming the tensor when the checkpoint cannot give a true average (a missing or
    misshapen z, beta1 outside (0, 1), a value that is not finite) instead of writing a wrong LoRA.
    """
    lora, info = checkpoint_lora_and_average(folder)
    averaged = {}
    for name, y in lora.items():
        entry = info.get(name)
        if entry is None:
            raise _refusal(folder, f"{name} is in lora.safetensors but in no optimizer param group")
        _check_finite(folder, f"lora.safetensors: {name}", y)
        if not entry["train_mode"] or not entry["stepped"]:  # saved in eval mode, or never moved: y is x
            averaged[name] = y
            continue
        z, beta1 = entry["z"], entry["beta1"]
        if z is None:
            raise _refusal(folder, f"optimizer.safetensors has no z/{name} (needed for the average)")
        if z.shape != y.shape:
            raise _refusal(
                folder, f"z/{name} has shape {tuple(z.shape)} but the LoRA tensor has {tuple(y.shape)}"
            )
        _check_finite(folder, f"optimizer.safetensors: z/{name}", z)
        if not (isinstance(beta1, (int, float)) and 0 < beta1 < 1):
            raise _refusal(folder, f"beta1 of {name}'s param group is {beta1!r}; it must lie in (0, 1)")
        averaged[name] = (y.float() - (1 - beta1) * z.float()) / beta1
    return averaged


def _check_finite(folder: Path, what: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise _refusal(folder, f"{what} holds NaN or infinite values")


def _refusal(folder: Path, problem: str) -> ValueError:
    return ValueError(
        f"cannot export checkpoint {folder}: {problem}. The checkpoint is damaged or inconsistent; "
        "export an older one (--checkpoint STEP)."
    )


def lora_components(
    state_dict: dict[str, torch.Tensor], config: TrainConfig, dtype: torch.dtype
) -> list[LoraComponent]:
    """Split "<component>.<peft parameter name>" tensors into per-component PEFT state dicts."""
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        component, _, key = name.partition(".")
        key = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        by_component.setdefault(component, {})[key] = tensor.to(dtype)
    lora = config.lora
    components = []
    for component, tensors in by_component.items():
        targets = _target_modules(config, component)
        peft_config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.effective_alpha, target_modules=targets)
        components.append(LoraComponent(name=component, state_dict=tensors, config=peft_config))
    return components


def _target_modules(config: TrainConfig, component: str) -> str | list[str]:
    """The PEFT target_modules `component` was trained with (written into lora_adapter_metadata)."""
    if component == "unet":
        return config.lora.target_modules
    if component == "transformer":
        from trainers.models import transformer_target_modules

        return transformer_target_modules(config.model.family, config.flux)
    return config.lora.text_encoder_target_modules


def export_checkpoint(
    run_dir: Path, checkpoint: Path | None = None, formats: list[str] | None = None
) -> list[Path]:
    """Write the eval-mode LoRA of `checkpoint` (default: the newest) in each format; returns the files."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.toml")
    if checkpoint is None:
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            raise FileNotFoundError(f"{run_dir} has no checkpoint to export yet")
        checkpoint = checkpoints[-1][1]
    document = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    step = document["trainer"]["step"]
    metadata = _metadata(run_dir, document, step)
    components = lora_components(
        eval_mode_lora_state_dict(checkpoint), config, TORCH_DTYPES[config.saving.dtype]
    )
    written = []
    stem = f"{config.name}-step{step:06d}"
    for fmt in formats or config.saving.formats:
        write = lora_writer(config.model.family, fmt)
        suffix = "-diffusers" if fmt == "diffusers" else ""
        written.append(write(run_dir / "lora" / f"{stem}{suffix}.safetensors", components, metadata))
    return written


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint at the step with the lowest validation loss; ValueError saying what to do when the
    run has no validation or that checkpoint was not kept."""
    from trainers.checkpoint import checkpoint_dir
    from trainers.events import read_events

    run_dir = Path(run_dir)
    results = [e for e in read_events(run_dir) if e.get("type") == "validation"]
    if not results:
        raise ValueError(
            f"{run_dir} has no validation results, so there is no best step; set dataset.validation (a "
            "folder, or a fraction to hold out such as 0.1) and validation.every_n_steps in the config"
        )
    best = min(results, key=lambda e: e["loss"])
    kept = dict(list_checkpoints(run_dir))
    if best["step"] in kept:
        return kept[best["step"]]
    config = load_config(run_dir / "config.toml")
    every = config.validation.every_n_steps
    kept_text = ", ".join(str(step) for step in kept) or "none"
    raise ValueError(
        f"the best validation loss ({best['loss']:.5g}) was at step {best['step']}, but no checkpoint of that "
        f"step was kept (kept steps: {kept_text}; {checkpoint_dir(run_dir, best['step'])} is missing). To keep it "
        f"next time set saving.every_n_steps = {every or 'validation.every_n_steps'} (validate and save at the "
        "same steps: pruning keeps the best step's checkpoint); `--checkpoint STEP` exports one of the kept steps"
    )


def _metadata(run_dir: Path, document: dict, step: int) -> dict[str, str]:
    path = run_dir / EXPORT_METADATA_FILE
    metadata = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    names = metadata.pop("ppsf_group_names", None) or [
        f"group{i}" for i in range(len(document["param_groups"]))
    ]
    metadata["ss_steps"] = str(step)
    metadata["ppsf_final_d"] = json.dumps({n: g["d"] for n, g in zip(names, document["param_groups"])})
    metadata["ppsf_eval_mode"] = "schedule-free average x"
    return {k: str(v) for k, v in metadata.items()}
