"""Resumable checkpoints: LoRA weights, optimizer state, RNG states and data position, all safetensors/JSON.

runs/<name>/checkpoints/step-000250/
    lora.safetensors       the LoRA at the training point y, keys "<component>.<peft key>"
    optimizer.safetensors  per-parameter optimizer state, keys "<key>/<component>.<peft key>"
    trainer_state.json     step, epoch, batch, optimizer param groups, RNG states
Written into a temporary folder and renamed, so a checkpoint folder is always complete; a checkpoint is
removed only once a newer (or its own replacement) is complete. A folder damaged later (a truncated file) is
not listed: `list_checkpoints` returns intact checkpoints only. Nothing is unpickled on load. Listing and
checking checkpoints imports no torch (`check` notes a run folder's checkpoints in well under a second).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from trainers.atomic import fault_point, remove_path, stale_temporaries, temporary_sibling, write_safetensors

if TYPE_CHECKING:
    import torch

CHECKPOINTS = "checkpoints"
CHECKPOINT_FILES = ("lora.safetensors", "optimizer.safetensors", "rng.safetensors")
STATE_FILE = "trainer_state.json"
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    step: int  # optimizer steps done
    epoch: int  # epoch the next batch comes from
    batch_in_epoch: int  # index of the next batch within that epoch's order (the same on every rank)
    python_rng: list = field(default_factory=list)  # random.Random state of caption/crop choices
    d_history: list[list[float]] = field(default_factory=list)  # recent d per group, for prodigy_steps="auto"
    d_frozen_logged: bool = False
    # Batches are micro-batches of training.batch_size samples in one order shared by all processes, so
    # (epoch, batch_in_epoch) is a position in samples whatever the number of processes. A step takes this
    # many of them over all processes (batch_size * this = the global batch); 0: a single-process checkpoint
    # from before multi-process training (gradient_accumulation of them).
    micro_batches_per_step: int = 0
    samples_seen: int = 0  # samples trained on, all processes together


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder, intact or not, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    found = []
    if folder.is_dir():
        for child in folder.iterdir():
            match = _STEP_FOLDER.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
    return sorted(found)


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder ("<file>: <why>"), or None if it is intact.

    Reads the JSON and each safetensors header only: safe_open checks that the tensors listed in the header
    cover the file exactly, so a truncated or padded file is caught without reading the weights.
    """
    folder = Path(folder)
    try:
        document = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        TrainerState(**document["trainer"])
        if not isinstance(document["param_groups"], list):
            raise TypeError("param_groups is not a list")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        return f"{folder / STATE_FILE}: unreadable ({type(error).__name__}: {error})"
    for name in CHECKPOINT_FILES:
        try:
            # numpy, not pt: the same header checks without importing torch (tensors are not read)
            with safe_open(str(folder / name), framework="numpy") as handle:
                handle.keys()
        except (OSError, SafetensorError) as error:
            return f"{folder / name}: unreadable ({error})"
    return None


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of each intact checkpoint, oldest first."""
    return [(step, folder) for step, folder in step_folders(run_dir) if checkpoint_problem(folder) is None]


def broken_checkpoints(run_dir: Path) -> list[str]:
    """What is wrong with each checkpoint newer than the newest intact one (what `resume` skips)."""
    intact = list_checkpoints(run_dir)
    newest = intact[-1][0] if intact else -1
    problems = [checkpoint_problem(folder) for step, folder in step_folders(run_dir) if step > newest]
    return [p for p in problems if p]


def recover_run_folder(run_dir: Path) -> None:
    """Tidy what killed writes left behind: temporary files and folders of writers that are gone.

    An intact temporary checkpoint folder whose step-N folder is missing (a kill between save_checkpoint's
    renames: the old one moved aside, the new one complete but not yet in place) is renamed into place,
    not deleted.
    """
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / "samples", run_dir / "lora"):
        for path, _ in stale_temporaries(folder):
            remove_path(path)
    for path, name in stale_temporaries(run_dir / CHECKPOINTS):
        target = path.with_name(name)
        if _STEP_FOLDER.match(name) and not target.exists() and checkpoint_problem(path) is None:
            os.replace(path, target)
        else:
            remove_path(path)


def named_parameters(modules: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by checkpoint name "<component>.<parameter name>"."""
    return {
        f"{component}.{name}": p
        for component, module in modules.items()
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def optimizer_state_tensors(
    optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The optimizer's per-parameter tensors by name, and its param groups with parameter names."""
    import torch

    names = {id(p): name for name, p in params.items()}
    tensors = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                # a copy: the optimizer keeps state as views of per-batch tensors, which safetensors refuses
                tensors[f"{key}/{names[id(p)]}"] = value.detach().to("cpu", copy=True).contiguous()
    groups = []
    for group in optimizer.param_groups:
        entry = {k: v for k, v in group.items() if k != "params"}
        entry["params"] = [names[id(p)] for p in group["params"]]
        groups.append(entry)
    return tensors, groups


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params: dict[str, torch.nn.Parameter],
    tensors: dict[str, torch.Tensor],
    groups: list[dict[str, Any]],
) -> None:
    """Rebuild a state_dict from named tensors and groups, then load it (dtypes kept as saved)."""
    index = {name: i for i, name in enumerate(n for g in groups for n in g["params"])}
    if set(index) != set(params):
        missing = sorted(set(params) - set(index))[:3]
        raise ValueError(f"checkpoint does not match the model's LoRA parameters (e.g. {missing})")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        state_key, _, name = key.partition("/")
        state.setdefault(index[name], {})[state_key] = value
    param_groups = []
    for group in groups:
        entry = dict(group)
        entry["params"] = [index[name] for name in group["params"]]
        entry["betas"] = tuple(entry["betas"])
        param_groups.append(entry)
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_checkpoint(
    run_dir: Path,
    state: TrainerState,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    keep_last: int,
    keep_step: int | None = None,
) -> Path:
    """Write a complete checkpoint folder atomically and delete all but the newest `keep_last`, and the
    checkpoint of `keep_step` (the best validation step, which `export --best` reads) if there is one."""
    import torch

    lora = {name: p.detach().to("cpu").contiguous() for name, p in params.items()}
    optimizer_tensors, groups = optimizer_state_tensors(optimizer, params)
    rng = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state().to("cpu")}
    if torch.cuda.is_available():
        rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    document = {"trainer": asdict(state), "param_groups": groups, "generator_device": str(generator.device)}

    def write(folder: Path) -> None:
        write_safetensors(folder / "lora.safetensors", lora)
        fault_point("checkpoint-write")
        write_safetensors(folder / "optimizer.safetensors", optimizer_tensors)
        write_safetensors(folder / "rng.safetensors", rng)
        (folder / "trainer_state.json").write_text(json.dumps(document, indent=1), encoding="utf-8")

    target = checkpoint_dir(run_dir, state.step)
    target.parent.mkdir(parents=True, exist_ok=True)
    new = temporary_sibling(target)
    new.mkdir()
    try:
        write(new)
        _replace_folder(new, target)
    finally:
        remove_path(new)
    _prune(run_dir, keep_last, keep_step)
    return target


def _replace_folder(new: Path, target: Path) -> None:
    """Rename the complete folder `new` to `target`; an old `target` (the same step saved again) is moved
    aside first and deleted last, so a kill at any moment leaves a complete copy (recover_run_folder)."""
    old = temporary_sibling(target) if target.exists() else None
    if old is not None:
        os.replace(target, old)
        fault_point("checkpoint-swap")
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        remove_path(old)


def _prune(run_dir: Path, keep_last: int, keep_step: int | None) -> None:
    """Delete checkpoints older than the newest `keep_last` intact ones, except `keep_step`'s (renamed away
    first, so a half-deleted folder is never taken for a checkpoint)."""
    kept = list_checkpoints(run_dir)[-keep_last:]
    for step, folder in step_folders(run_dir):
        if kept and step < kept[0][0] and step != keep_step:
            doomed = temporary_sibling(folder)
            os.replace(folder, doomed)
            fault_point("checkpoint-prune")
            remove_path(doomed)


def load_checkpoint(
    folder: Path,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> TrainerState:
    """Restore weights, optimizer, RNG states; returns the trainer state to continue from."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    document = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    lora = load_file(folder / "lora.safetensors")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(lora[name])
    load_optimizer_state(
        optimizer, params, load_file(folder / "optimizer.safetensors"), document["param_groups"]
    )
    rng = load_file(folder / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    generator.set_state(rng["generator"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    return TrainerState(**document["trainer"])


def saved_trainer_state(folder: Path) -> TrainerState:
    """The trainer state of a checkpoint, read without loading anything else."""
    document = json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))
    return TrainerState(**document["trainer"])


def restore_python_rng(rng: random.Random, state: list) -> None:
    """random.Random state from its JSON form (lists where Python had tuples)."""
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


def checkpoint_lora_and_average(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The checkpoint's LoRA at the training point, and for each parameter what eval mode needs (z, beta1).

    Lets export compute the schedule-free average x = (y - (1 - beta1) z) / beta1 without loading a model.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    document = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    lora = load_file(folder / "lora.safetensors")
    optimizer_tensors = load_file(folder / "optimizer.safetensors")
    stepped = {
        key.partition("/")[2] for key in optimizer_tensors
    }  # a parameter never given a gradient has no state
    info = {}
    for group in document["param_groups"]:
        for name in group["params"]:
            info[name] = {
                "stepped": name in stepped,
                "z": optimizer_tensors.get(f"z/{name}"),
                "beta1": group["betas"][0],
                "train_mode": group["train_mode"],
                "d": group["d"],
            }
    return lora, info
