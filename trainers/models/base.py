"""What the training loop asks of a model family. SDXL implements it in sdxl.py; Flux will be flux.py."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from trainers.config import TrainConfig

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # config names
CAPTION_EXCERPT_CHARS = 60


def caption_length_warning(caption: str, tokens: int, limit: int) -> str:
    """The one-line warning for a caption the text encoder will cut at `limit` tokens."""
    excerpt = caption if len(caption) <= CAPTION_EXCERPT_CHARS else caption[:CAPTION_EXCERPT_CHARS] + "…"
    return (
        f"caption {excerpt!r} is {tokens} tokens long; the text encoder reads only the first {limit}, "
        "the rest is ignored (shorten the caption to keep what matters)"
    )


@dataclass(frozen=True)
class SampleConditioning:
    """Per-image facts some families condition on (SDXL's micro-conditioning)."""

    original_size: tuple[int, int]  # (h, w) before resizing
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image
    target_size: tuple[int, int]  # (h, w) trained at


class ModelAdapter(ABC):
    """One model family: loading, encoders, LoRA placement, the training objective, sampling, export names."""

    family: str
    # Components a LoRA can be trained on, in optimizer-group order (the first is the denoiser).
    components: tuple[str, ...]

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.dtype = TORCH_DTYPES[config.training.precision]

    @abstractmethod
    def load(self) -> None:
        """Load every component (repo id, diffusers folder or single file), frozen, in the training dtype."""

    @abstractmethod
    def cache_fingerprint(self) -> str:
        """Identifies what the cached latents and text embeddings depend on (model and its settings)."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) to the latents the denoiser trains on (sampled with `generator`)."""

    @abstractmethod
    def encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Captions to the text conditioning the denoiser takes (with grad when text encoders train)."""

    @abstractmethod
    def offload_encoders(self) -> None:
        """Move what is only needed for encoding (and sampling) off the training device, and the denoiser
        onto it (load() leaves it off, so encoders and denoiser never need to fit together)."""

    @abstractmethod
    def add_lora(self) -> dict[str, list[torch.nn.Parameter]]:
        """Inject LoRA adapters as configured; returns the trainable parameters per component."""

    @abstractmethod
    def lora_modules(self) -> dict[str, torch.nn.Module]:
        """The modules carrying LoRA adapters, per component."""

    @abstractmethod
    def training_loss(
        self,
        latents: torch.Tensor,
        text: dict[str, torch.Tensor],
        conditioning: list[SampleConditioning],
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Per-sample loss of one batch (noise, timesteps and weighting drawn from `generator`)."""

    @abstractmethod
    def sample(self, prompts: list[str], seed: int) -> list[Image.Image]:
        """One image per prompt with the current weights, at fixed seeds."""

    @abstractmethod
    def export_metadata(self) -> dict[str, str]:
        """Family-specific safetensors metadata for exported LoRAs (kohya ss_* and modelspec keys)."""

    @abstractmethod
    def set_gradient_checkpointing(self) -> None:
        """Turn on (non-reentrant) gradient checkpointing for the trained modules."""

    @staticmethod
    def is_single_file(path: str) -> bool:
        return path.endswith((".safetensors", ".sft")) and Path(path).is_file()
