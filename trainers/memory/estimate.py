"""The memory a training run needs on its device, phase by phase, in the order trainers/train.py runs them.

1. load and fill caches: the adapter puts the VAE and text encoders on the device (the denoiser stays on
   the CPU), encodes whatever the latent and text caches miss;
2. train: `offload_encoders()` moves them off and the denoiser on; encoders come back only when they train
   or when a step must encode (latents or captions not cached); LoRA weights, optimizer state, gradients
   (the fused backward pass steps and frees them in 16 MiB buckets) and the step's activations;
3. sample (when prompts are set): text encoders and VAE join the denoiser for the samples, then leave.

The peak is the largest phase, not the sum. Activations and workspaces are measured by running the family's
real architecture on the meta device (trainers/memory/measure.py); weights and optimizer state are counted.
On a CPU run nothing moves, so every component counts in every phase.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from trainers.atomic import atomic_write_text
from trainers.config import TrainConfig
from trainers.memory.family import Component, FamilyMemoryModel
from trainers.memory.measure import (
    CheckpointInputs,
    DeviceEmulation,
    LiveTensors,
    fused_gradient_buckets,
    saved_for_backward,
)
from trainers.memory.optimizer_state import FUSED_BUCKET_BYTES, optimizer_bytes
from trainers.models.base import TORCH_DTYPES

# Allowances for what a live-tensor count cannot see; stated, not measured (no GPU has checked them yet).
CUDA_CONTEXT_BYTES = 512 << 20  # CUDA context, cuBLAS/cuDNN handles and workspaces (typically 0.3-0.6 GiB)
ALLOCATOR_FRACTION = 0.10  # the caching allocator's rounding and fragmentation above the live peak

GIB = 1 << 30


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    detail: str = ""


@dataclass(frozen=True)
class Phase:
    name: str
    parts: tuple[Part, ...]

    @property
    def total(self) -> int:
        return sum(part.bytes for part in self.parts)


@dataclass(frozen=True)
class MemoryEstimate:
    device_type: str
    architecture: str
    phases: tuple[Phase, ...]

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda phase: phase.total)

    @property
    def measured_peak(self) -> int:
        """The largest phase: live tensor bytes, as torch.cuda.max_memory_allocated would count them."""
        return self.peak_phase.total

    @property
    def allowances(self) -> tuple[Part, ...]:
        if self.device_type != "cuda":
            return ()
        return (
            Part("CUDA context (allowance)", CUDA_CONTEXT_BYTES, "stated constant, not measured"),
            Part(
                "allocator reserve (allowance)",
                int(self.measured_peak * ALLOCATOR_FRACTION),
                f"{ALLOCATOR_FRACTION:.0%} of the peak, stated, not measured",
            ),
        )

    @property
    def total(self) -> int:
        """What the card needs: the peak phase plus the allowances."""
        return self.measured_peak + sum(part.bytes for part in self.allowances)

    def fits(self, card_bytes: int) -> bool:
        return self.total <= card_bytes


def estimate(config: TrainConfig, device_type: str = "cuda") -> MemoryEstimate:
    """The peak memory of `config`'s run on a `device_type` ("cuda" or "cpu") device, phase by phase."""
    return _compose(config, device_type, _measure(config, device_type))


# ------------------------------------------------------------------ measuring on the meta device
def _measure(config: TrainConfig, device_type: str) -> dict[str, int | str | list]:
    """All measurements `config` needs, each cached on the config fields it depends on."""
    measured = {**_cached("encoding", _encoding_key(config), device_type)}
    measured.update(_cached("training", _training_key(config), device_type))
    if config.sampling.prompts:
        measured.update(_cached("sampling", _sampling_key(config), device_type))
    return measured


def _base_key(config: TrainConfig) -> dict:
    model, flux = config.model.model_dump(mode="json"), config.flux.model_dump(mode="json")
    return {"model": model, "precision": config.training.precision, "flux": flux}


def _encoding_key(config: TrainConfig) -> dict:
    return {**_base_key(config), "resolution": config.dataset.resolution}


def _training_key(config: TrainConfig) -> dict:
    return {
        **_encoding_key(config),
        "lora": config.lora.model_dump(mode="json"),
        "optimizer": config.optimizer.model_dump(mode="json"),
        "text_each_step": not _text_cached(config),
        "batch": config.training.batch_size,
        "checkpointing": config.training.gradient_checkpointing,
    }


def _sampling_key(config: TrainConfig) -> dict:
    height, width = _sample_size(config)
    return {**_base_key(config), "height": height, "width": width}


def _cached(kind: str, key: dict, device_type: str) -> dict:
    """A measurement from memory, else from the disk cache, else measured (and stored in both)."""
    text = json.dumps(
        {"kind": kind, "device": device_type, "key": key, "code": _code_version()}, sort_keys=True
    )
    if text in _MEMORY_CACHE:
        return _MEMORY_CACHE[text]
    path = cache_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        result = stored["result"] if stored.get("key") == text else None
    except (OSError, ValueError, KeyError):
        result = None
    if result is None:
        result = _MEASUREMENTS[kind](_config_for_measuring(key), device_type)
        with contextlib.suppress(OSError):  # a read-only home only costs the next run the measurement
            atomic_write_text(path, json.dumps({"key": text, "result": result}))
    _MEMORY_CACHE[text] = result
    return result


_MEMORY_CACHE: dict[str, dict] = {}


def cache_dir() -> Path:
    """Where measurements are kept between runs (PPSF_MEMORY_CACHE, else ~/.cache/ppsf-trainer/memory)."""
    default = Path.home() / ".cache" / "ppsf-trainer" / "memory"
    return Path(os.environ.get("PPSF_MEMORY_CACHE", default))


@functools.cache
def _code_version() -> str:
    """Measurements are redone when the measuring code, a family's memory model or a library changes."""
    import diffusers
    import peft
    import transformers

    digest = hashlib.sha256()
    here = Path(__file__).parent
    for path in sorted([*here.glob("*.py"), *(here.parent / "models").glob("*.py")]):
        digest.update(path.read_bytes())
    for version in (torch.__version__, diffusers.__version__, peft.__version__, transformers.__version__):
        digest.update(version.encode())
    return digest.hexdigest()[:16]


def _config_for_measuring(key: dict) -> TrainConfig:
    """A config holding the measured fields (the others do not change what is measured)."""
    from trainers.config import validate_config

    data = {
        "name": "estimate",
        "model": key["model"],
        "dataset": {
            "path": ".",
            "resolution": key.get("resolution", 1024),
            "cache_text_embeddings": not key.get("text_each_step", False),
        },
        "training": {
            "max_steps": 1,
            "batch_size": key.get("batch", 1),
            "precision": key["precision"],
            "gradient_checkpointing": key.get("checkpointing", False),
        },
        "sampling": {"height": key.get("height"), "width": key.get("width")},
    }
    for section in ("lora", "optimizer", "flux"):
        if section in key:
            data[section] = key[section]
    return validate_config(data)


def _family_model(config: TrainConfig, device_type: str) -> FamilyMemoryModel:
    from trainers.models import memory_model_for

    return memory_model_for(config.model.family)(config, device_type)


def _autocast_dtype(config: TrainConfig) -> torch.dtype | None:
    """The adapter runs the denoiser under autocast unless it trains in fp32."""
    dtype = TORCH_DTYPES[config.training.precision]
    return None if dtype == torch.float32 else dtype


def _measure_encoding(config: TrainConfig, device_type: str) -> dict:
    model = _family_model(config, device_type)
    resolution = config.dataset.resolution
    no_autocast = DeviceEmulation(device_type, None)  # the adapter encodes outside autocast
    return {
        "architecture": model.architecture_source,
        "components": [dataclasses.asdict(c) for c in model.components()],
        "encode_image": _peak(lambda: model.encode_image(resolution, resolution), no_autocast),
        "encode_captions": _peak(lambda: model.encode_captions(1), no_autocast),
    }


def _measure_sampling(config: TrainConfig, device_type: str) -> dict:
    model = _family_model(config, device_type)
    height, width = _sample_size(config)
    emulation = DeviceEmulation(device_type, _autocast_dtype(config))
    return {
        "sample_step": _peak(lambda: model.sample_step(height, width), emulation),
        "decode": _peak(lambda: model.decode(height, width), DeviceEmulation(device_type, None)),
    }


def _measure_training(config: TrainConfig, device_type: str) -> dict:
    model = _family_model(config, device_type)
    by_component = model.add_lora()
    named = {name: p for params in by_component.values() for name, p in params.items()}
    params = list(named.values())
    zero_init = ["lora_B" in name for name in named]  # peft starts B at zero
    opt = optimizer_bytes(params, config.optimizer, zero_init, groups=len(by_component))
    emulation = DeviceEmulation(device_type, _autocast_dtype(config))
    gradients, activations, step_peak = _training_step(model, config, params, emulation)
    return {
        "lora_params": sum(p.numel() for p in params),
        "lora_bytes": sum(p.numel() * p.element_size() for p in params),
        "optimizer_state": opt.state,
        "optimizer_buffers": opt.step_buffers,
        "gradients": gradients,
        "activations": activations,
        "step_peak": step_peak,
    }


_MEASUREMENTS = {"encoding": _measure_encoding, "training": _measure_training, "sampling": _measure_sampling}


def _peak(run: Callable[[], None], emulation: DeviceEmulation) -> int:
    tracker = LiveTensors()
    with emulation, tracker:
        run()
    return tracker.peak


def _training_step(
    model: FamilyMemoryModel,
    config: TrainConfig,
    params: list[torch.nn.Parameter],
    emulation: DeviceEmulation,
) -> tuple[int, int, int]:
    """(gradients alive at once, activations kept for backward, the step's peak) of one micro-batch."""
    tracker = LiveTensors()
    checkpoint = CheckpointInputs(tracker, emulation)
    if config.training.gradient_checkpointing:
        model.set_gradient_checkpointing(checkpoint)
    grad_bytes = [p.numel() * p.element_size() for p in params]
    handles = []
    if config.optimizer.fused_back_pass:
        handles = fused_gradient_buckets(params, FUSED_BUCKET_BYTES)
        gradients = min(sum(grad_bytes), FUSED_BUCKET_BYTES + max(grad_bytes, default=0))
    else:
        gradients = sum(grad_bytes)
    resolution, batch = config.dataset.resolution, config.training.batch_size
    try:
        with emulation, tracker:
            with saved_for_backward(tracker) as saved:
                loss = model.training_loss(batch, resolution, resolution)
            kept = {**saved, **checkpoint.kept}
            loss.backward()
            del loss
    finally:
        for handle in handles:
            handle.remove()
        for p in params:
            p.grad = None
    return gradients, sum(kept.values()), tracker.peak


# ------------------------------------------------------------------ phases
def _compose(config: TrainConfig, device_type: str, measured: dict) -> MemoryEstimate:
    on_cpu = device_type == "cpu"  # nothing moves: every component is in the same memory throughout
    m = SimpleNamespace(**{"sample_step": 0, "decode": 0, **measured})
    components = [Component(**c) for c in m.components]
    by_role = {
        role: [c for c in components if c.role == role]
        for role in ("denoiser", "text_encoder", "image_encoder")
    }

    def weight_parts(roles: list[str]) -> list[Part]:
        return [
            Part(f"base weights: {c.name}", c.bytes, f"{c.precision}, {_count(c.params)} params")
            for role in roles
            for c in by_role[role]
        ]

    everything = ["denoiser", "text_encoder", "image_encoder"]
    resolution = config.dataset.resolution
    latents_cached = config.dataset.cache_latents and config.dataset.crop == "center"
    text_cached = _text_cached(config)

    caching_work = max(m.encode_image if latents_cached else 0, m.encode_captions if text_cached else 0)
    caching = Phase(
        "load and fill caches",
        (
            *weight_parts(everything if on_cpu else ["text_encoder", "image_encoder"]),
            Part(
                "workspace: encoding", caching_work, f"VAE encode at {resolution}x{resolution}, text encoders"
            ),
        ),
    )

    trained = _trained_parts(config, m)
    resident = ["denoiser"]
    if on_cpu or config.lora.train_text_encoder or not text_cached:
        resident.append("text_encoder")
    if on_cpu or not latents_cached:
        resident.append("image_encoder")
    step_work = max(m.step_peak - m.activations - m.gradients, 0)
    if not latents_cached:
        step_work = max(step_work, m.encode_image - m.activations - m.gradients)
    training = Phase(
        "training",
        (
            *weight_parts(resident),
            *trained,
            Part("gradients", m.gradients, _gradient_detail(config)),
            Part("activations kept for backward", m.activations, _activation_detail(config)),
            Part("backward workspace", step_work, "gradients of activations, recomputed blocks, attention"),
        ),
    )
    phases = [caching, training]
    if config.sampling.prompts:
        height, width = _sample_size(config)
        phases.append(
            Phase(
                "sampling",
                (
                    *weight_parts(everything),
                    *trained,
                    Part(
                        "workspace: sampling",
                        max(m.sample_step, m.decode, m.encode_captions),
                        f"denoiser step with guidance and VAE decode at {width}x{height}",
                    ),
                ),
            )
        )
    return MemoryEstimate(device_type=device_type, architecture=m.architecture, phases=tuple(phases))


def _trained_parts(config: TrainConfig, m: SimpleNamespace) -> tuple[Part, ...]:
    per_param = (m.optimizer_state + m.optimizer_buffers) / max(m.lora_params, 1)
    return (
        Part(
            "LoRA weights",
            m.lora_bytes,
            f"fp32, rank {config.lora.rank}, {_count(m.lora_params)} params",
        ),
        Part(
            "optimizer state (ppsf_optim)",
            m.optimizer_state + m.optimizer_buffers,
            f"{per_param:.1f} bytes/param incl. step buffers, while d adapts",
        ),
    )


def _gradient_detail(config: TrainConfig) -> str:
    if config.optimizer.fused_back_pass:
        return f"fused backward pass: only the current {FUSED_BUCKET_BYTES >> 20} MiB bucket is alive"
    return "all LoRA gradients until optimizer.step()"


def _activation_detail(config: TrainConfig) -> str:
    training = config.training
    size = config.dataset.resolution
    checkpointing = "on" if training.gradient_checkpointing else "off"
    return f"{size}x{size}, batch {training.batch_size}, {training.precision}, checkpointing {checkpointing}"


def _text_cached(config: TrainConfig) -> bool:
    """Whether the trainer caches text embeddings (train.py: only for fixed captions, frozen encoders)."""
    dataset = config.dataset
    return dataset.cache_text_embeddings and not dataset.shuffle_tags and not config.lora.train_text_encoder


def _sample_size(config: TrainConfig) -> tuple[int, int]:
    sampling = config.sampling
    return (sampling.height or config.dataset.resolution, sampling.width or config.dataset.resolution)


def _count(n: int) -> str:
    return f"{n / 1e6:,.1f} M" if n >= 100_000 else f"{n:,}"
