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
        # each sample prompt's text conditioning for the pipeline (CPU tensors), encoded before training
        self._sample_texts: dict[str, dict[str, torch.Tensor]] = {}

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
    def validation_loss(
        self,
        latents: torch.Tensor,
        text: dict[str, torch.Tensor],
        conditioning: list[SampleConditioning],
        noise: torch.Tensor,
        quantiles: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample loss of the training objective at given `noise` (latents' shape) and at the timesteps
        at `quantiles` in (0, 1) of the training timestep distribution; draws nothing at random."""

    @abstractmethod
    def sample(self, prompts: list[str], seed: int) -> list[Image.Image]:
        """One image per prompt with the current weights, at fixed seeds. Prompts that `prepare_samples`
        encoded need no frozen text encoder: only the denoiser and the VAE are on the device."""

    def prepare_samples(self, prompts: list[str]) -> None:
        """Encode the sample prompts now, while the text encoders are on the device for the caches (call it
        before `offload_encoders`), so that samples never bring a frozen text encoder back beside the
        denoiser. Prompts it has not seen are encoded when sampled, as before."""
        self._sample_texts = {}
        self._encode_sample_prompts(prompts)

    @torch.no_grad()
    def _encode_sample_prompts(self, prompts: list[str]) -> None:
        """Encode the prompts not encoded yet, under the autocast samples run in (so the embeddings are the
        ones the pipeline would make from the prompt itself)."""
        for prompt in dict.fromkeys(prompts):
            if prompt in self._sample_texts:
                continue
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                text = self._encode_sample_prompt(prompt)
            self._sample_texts[prompt] = {k: v.to("cpu") for k, v in text.items() if v is not None}

    def _sample_text(self, prompt: str) -> dict[str, torch.Tensor]:
        """The pipeline's text arguments for `prompt`, on the device (encoded first if it is new)."""
        self._encode_sample_prompts([prompt])
        return {k: v.to(self.device) for k, v in self._sample_texts[prompt].items()}

    @abstractmethod
    def _encode_sample_prompt(self, prompt: str) -> dict[str, torch.Tensor | None]:
        """The family pipeline's text arguments (prompt_embeds, ...) for one sample prompt, made with the
        text encoders on the device."""

    @abstractmethod
    def export_metadata(self) -> dict[str, str]:
        """Family-specific safetensors metadata for exported LoRAs (kohya ss_* and modelspec keys)."""

    @abstractmethod
    def set_gradient_checkpointing(self) -> None:
        """Turn on (non-reentrant) gradient checkpointing for the trained modules."""

    # ------------------------------------------------------------------ checks before loading
    model_file_hint: str  # what a single model file of this family is, for messages ("an SDXL ...")

    @classmethod
    def check_device(cls, config: TrainConfig, device: torch.device) -> None:
        """Raise naming the field when `device` cannot run what the config asks (nothing is loaded yet)."""
        return None  # SDXL needs nothing the config can ask a device for

    @classmethod
    @abstractmethod
    def check_model_file(cls, path: Path, keys: list[str]) -> str | None:
        """Why a single .safetensors file with tensor names `keys` is not this family's model, or None."""

    @classmethod
    @abstractmethod
    def lora_target_lists(cls, config: TrainConfig) -> list[tuple[str, str, list[str]]]:
        """(config field, component, module names) of each component whose raw target names can be
        checked against the architecture (a family's named target sets need no check)."""

    @classmethod
    @abstractmethod
    def component_config(cls, model_path: str, component: str) -> dict | None:
        """A demo:// model's component config (None for other paths: read from the folder or Hub cache)."""

    @classmethod
    @abstractmethod
    def meta_component(cls, component: str, config: dict) -> torch.nn.Module:
        """`component` built from its config dict (call under torch.device("meta") for shapes only)."""

    @staticmethod
    def is_single_file(path: str) -> bool:
        return path.endswith((".safetensors", ".sft")) and Path(path).is_file()
