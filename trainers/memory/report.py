"""The estimate as people read it: `python -m trainers check` prints it, the UI's Setup page shows
`estimate_summary`; both say whether it fits the card and which one or two changes would make it fit."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from trainers.config import ConfigError, TrainConfig, validate_config
from trainers.memory.estimate import GIB, MemoryEstimate, estimate


@dataclass(frozen=True)
class Suggestion:
    change: str  # as --set arguments
    total: int  # the estimate with the change


# What a CUDA (or ROCm) driver puts on a Linux machine, WSL2 included; without any of them torch sees no GPU.
GPU_DRIVER_PATHS = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/dxg", "/dev/kfd")


def detected_card_bytes() -> int | None:
    """The memory of the GPU the trainer would use, if there is one (torch is asked only where a GPU
    driver is installed: importing it takes seconds, and `check` answers in under two)."""
    if not gpu_driver_present():
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def gpu_driver_present() -> bool:
    """False only where no CUDA device can be: a Linux machine without a GPU driver, or a Mac."""
    if sys.platform == "darwin":  # torch has no CUDA build for macOS
        return False
    if not sys.platform.startswith("linux"):
        return True  # Windows: ask torch
    return any(os.path.exists(path) for path in GPU_DRIVER_PATHS)


def card_bytes(vram_gib: float | None) -> tuple[int | None, str]:
    """(card size, how it was chosen): --vram when given, else the detected GPU, else none."""
    if vram_gib is not None:
        return int(vram_gib * GIB), f"a {vram_gib:g} GB card"
    detected = detected_card_bytes()
    if detected is not None:
        return detected, f"this GPU ({detected / GIB:.1f} GiB)"
    return None, ""


def suggestions(
    config: TrainConfig, card: int, device_type: str = "cuda", limit: int = 2
) -> list[Suggestion]:
    """Up to `limit` single changes that make `config` fit `card` bytes, cheapest in quality first; when no
    single change is enough, the shortest combination (in that order) that is."""
    candidates = _candidates(config)
    fitting = []
    for change in candidates:
        total = _total_with(config, change, device_type)
        if total is not None and total <= card:
            fitting.append(Suggestion(_describe(change), total))
            if len(fitting) == limit:
                return fitting
    if fitting:
        return fitting
    combined: dict = {}
    for change in candidates:
        combined.update(change)
        total = _total_with(config, combined, device_type)
        if total is not None and total <= card:
            return [Suggestion(_describe(combined), total)]
    return []


def _candidates(config: TrainConfig) -> list[dict[str, object]]:
    """Changes that lower the peak, roughly in order of what they cost in quality or speed."""
    dataset, training, lora = config.dataset, config.training, config.lora
    changes: list[dict[str, object]] = []
    if not training.gradient_checkpointing:
        changes.append({"training.gradient_checkpointing": True})
    if lora.train_text_encoder:
        changes.append({"lora.train_text_encoder": False})
    elif not dataset.cache_text_embeddings or dataset.shuffle_tags:
        changes.append({"dataset.cache_text_embeddings": True, "dataset.shuffle_tags": False})
    if not dataset.cache_latents or dataset.crop != "center":
        changes.append({"dataset.cache_latents": True, "dataset.crop": "center"})
    if training.batch_size > 1:
        changes.append({"training.batch_size": 1})
    if config.sampling.prompts:  # sampling brings the fp32 VAE (and its decode) next to the denoiser
        changes.append({"sampling.width": 512, "sampling.height": 512})
        changes.append({"sampling.prompts": []})
    for resolution in (768, 512):
        if dataset.resolution > resolution:
            changes.append({"dataset.resolution": resolution})
            break
    return changes


def _total_with(config: TrainConfig, change: dict[str, object], device_type: str) -> int | None:
    data = config.model_dump(mode="json", exclude_none=True)
    for key, value in change.items():
        section, field = key.split(".")
        data.setdefault(section, {})[field] = value
    try:
        return estimate(validate_config(data), device_type).total
    except ConfigError:
        return None


def _describe(change: dict[str, object]) -> str:
    def value(v: object) -> str:
        return str(v).lower() if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else str(v)

    return " ".join(f"--set {key}={value(v)}" for key, v in change.items())


def _gib(nbytes: int) -> str:
    if abs(nbytes) < GIB // 10:
        return f"{nbytes / (1 << 20):.1f} MiB"
    return f"{nbytes / GIB:.2f} GiB"


def format_estimate(est: MemoryEstimate) -> list[str]:
    """The phases and their parts, the peak and the allowances, as text lines."""
    lines = [f"memory estimate on the {est.device_type} device (architecture: {est.architecture})"]
    peak = est.peak_phase
    for phase in est.phases:
        marker = "  <- peak" if phase is peak else ""
        lines.append(f"  {phase.name}: {_gib(phase.total)}{marker}")
        for part in phase.parts:
            detail = f"  ({part.detail})" if part.detail else ""
            lines.append(f"    {part.name:<32} {_gib(part.bytes):>10}{detail}")
    allowance = " + ".join(f"{p.name} {_gib(p.bytes)}" for p in est.allowances)
    total = f"{_gib(est.measured_peak)} peak ({peak.name})"
    lines.append(f"  total: {total}" + (f" + {allowance} = {_gib(est.total)}" if allowance else ""))
    return lines


def verdict_lines(config: TrainConfig, est: MemoryEstimate, card: int | None, card_name: str) -> list[str]:
    if card is None:
        return ["  fits? give --vram GB to check against a card (no GPU detected)"]
    spare = card - est.total
    if spare >= 0:
        return [f"  fits {card_name}: {_gib(spare)} to spare"]
    lines = [f"  does NOT fit {card_name}: {_gib(-spare)} over"]
    found = suggestions(config, card, est.device_type)
    for suggestion in found:
        lines.append(f"  to fit: {suggestion.change}  (estimate {_gib(suggestion.total)})")
    if not found:
        lines.append("  no change this trainer offers makes it fit; a larger card is needed")
    return lines


def print_check(config: TrainConfig, vram_gib: float | None = None, file=None) -> None:
    """What `python -m trainers check` prints about memory; a failure to estimate is reported, never
    raised, so the config's other problems are still shown."""
    file = file or sys.stdout
    try:
        est = estimate(config)
        card, card_name = card_bytes(vram_gib)
        lines = format_estimate(est) + verdict_lines(config, est, card, card_name)
    except Exception as error:  # the estimate must not hide the check's own findings
        lines = [f"memory estimate unavailable: {type(error).__name__}: {error}"]
    lines.append(
        "  (estimated on the meta device; not yet compared with a real GPU, see README 'Memory estimate')"
    )
    print("\n".join(lines), file=file)


def estimate_summary(config: TrainConfig, vram_gib: float | None = None) -> str:
    """Markdown for the UI's Setup page: the peak, its split and the verdict for the card."""
    try:
        est = estimate(config)
        card, card_name = card_bytes(vram_gib)
    except Exception as error:
        return f"**Memory estimate unavailable:** {type(error).__name__}: {error}"
    peak = est.peak_phase
    rows = "\n".join(f"| {part.name} | {_gib(part.bytes)} |" for part in peak.parts)
    rows += "".join(f"\n| {part.name} | {_gib(part.bytes)} |" for part in est.allowances)
    text = [
        f"**Estimated peak: {_gib(est.total)}** (phase: {peak.name})",
        "",
        "| part | memory |",
        "|---|---|",
        rows,
        "",
    ]
    if card is None:
        text.append("No GPU here: enter the card's memory (GB) to see whether it fits.")
    else:
        text += [line.strip() for line in verdict_lines(config, est, card, card_name)]
    text.append("_Estimated on the meta device; not yet checked against a real GPU._")
    return "\n".join(text)
