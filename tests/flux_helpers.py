"""Shared set-up of the Flux tests: tiny models on disk, configs, adapters loaded through the real code."""

from __future__ import annotations

from pathlib import Path

import torch

from trainers.config import TrainConfig, validate_config
from trainers.models.flow_matching import FlowMatchingAdapter, FluxTrainingOptions
from trainers.models.flux import FluxAdapter
from trainers.models.flux2 import Flux2Adapter
from trainers.tiny_models import make_demo_image

CPU = torch.device("cpu")
ADAPTERS: dict[str, type[FlowMatchingAdapter]] = {"flux": FluxAdapter, "flux2": Flux2Adapter}


def make_config(model_path: Path | str, tmp_path: Path, **lora) -> TrainConfig:
    return validate_config(
        {
            "name": "flux-test",
            "output_dir": str(tmp_path / "runs"),
            "model": {"path": str(model_path)},
            "dataset": {"path": str(tmp_path), "resolution": 64},
            "lora": {"rank": 4, "alpha": 8, **lora},
            "training": {"max_steps": 10, "precision": "fp32", "seed": 7},
            "sampling": {"prompts": ["a red circle"]},
        }
    )


def load_adapter(
    family: str, model_path: Path | str, tmp_path: Path, options: FluxTrainingOptions | None = None, **lora
) -> FlowMatchingAdapter:
    adapter = ADAPTERS[family](
        make_config(model_path, tmp_path, **lora), CPU, options=options or FluxTrainingOptions()
    )
    adapter.load()
    return adapter


def demo_batch(
    adapter: FlowMatchingAdapter, indices: tuple[int, ...] = (0, 3)
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Latents and text of demo images `indices` (one size: 0, 3, 6 are 64 x 64, 1, 4 are 96 wide x 64
    high), encoded by the adapter as the caches would hold them."""
    images, captions = [], []
    for index in indices:
        image, caption = make_demo_image(index)
        width, height = image.size
        pixels = (
            torch.tensor(list(image.getdata()), dtype=torch.float32).view(height, width, 3).permute(2, 0, 1)
        )
        images.append(pixels / 127.5 - 1)
        captions.append(caption)
    with torch.no_grad():
        latents = adapter.encode_images(torch.stack(images), torch.Generator().manual_seed(0))
        text = adapter.encode_captions(captions)
    return latents, text


def fixed_loss(adapter: FlowMatchingAdapter, latents: torch.Tensor, text: dict[str, torch.Tensor]) -> float:
    """The loss on the same noise and timesteps every time (8 draws)."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return sum(adapter.training_loss(latents, text, None, generator).mean().item() for _ in range(8)) / 8


def randomise_lora(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every LoRA factor random values (lora_B starts at zero), so a LoRA changes every output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
