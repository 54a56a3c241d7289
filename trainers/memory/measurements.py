"""The measurements the estimate composes, each a pass of the family's real architecture on the meta
device (trainers/memory/measure.py's tools): encoding, one training step, sampling.

Each takes a config rebuilt from its cache key (`config_for_measuring`), so nothing outside the key can
change a measurement, and the family's architecture configs (whose digest is part of the key).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from trainers.config import TrainConfig, validate_config
from trainers.memory.family import FamilyMemoryModel
from trainers.memory.measure import (
    CheckpointInputs,
    DeviceEmulation,
    LiveTensors,
    fused_gradient_buckets,
    saved_for_backward,
)
from trainers.memory.optimizer_state import FUSED_BUCKET_BYTES, optimizer_bytes
from trainers.models.base import TORCH_DTYPES
from trainers.models.families import Architecture


def config_for_measuring(key: dict) -> TrainConfig:
    """A config holding the measured fields (the others do not change what is measured)."""
    data = {
        "name": "estimate",
        "model": {"family": key["family"], "path": "meta"},  # the architecture is given, not looked up
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


def family_model(config: TrainConfig, device_type: str, architecture: Architecture) -> FamilyMemoryModel:
    from trainers.models import memory_model_for

    return memory_model_for(config.model.family)(config, device_type, architecture)


def _autocast_dtype(config: TrainConfig) -> torch.dtype | None:
    """The adapter runs the denoiser under autocast unless it trains in fp32."""
    dtype = TORCH_DTYPES[config.training.precision]
    return None if dtype == torch.float32 else dtype


def measure_encoding(config: TrainConfig, device_type: str, architecture: Architecture) -> dict:
    model = family_model(config, device_type, architecture)
    resolution = config.dataset.resolution
    no_autocast = DeviceEmulation(device_type, None)  # the adapter encodes outside autocast
    return {
        "components": [dataclasses.asdict(c) for c in model.components()],
        "encode_image": _peak(lambda: model.encode_image(resolution, resolution), no_autocast),
        "encode_captions": _peak(lambda: model.encode_captions(1), no_autocast),
    }


def measure_sampling(config: TrainConfig, device_type: str, architecture: Architecture) -> dict:
    model = family_model(config, device_type, architecture)
    height = config.sampling.height or config.dataset.resolution
    width = config.sampling.width or config.dataset.resolution
    emulation = DeviceEmulation(device_type, _autocast_dtype(config))
    return {
        "sample_step": _peak(lambda: model.sample_step(height, width), emulation),
        "decode": _peak(lambda: model.decode(height, width), DeviceEmulation(device_type, None)),
    }


def measure_training(config: TrainConfig, device_type: str, architecture: Architecture) -> dict:
    model = family_model(config, device_type, architecture)
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


MEASUREMENTS: dict[str, Callable[[TrainConfig, str, Architecture], dict]] = {
    "encoding": measure_encoding,
    "training": measure_training,
    "sampling": measure_sampling,
}


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
