"""What the memory estimate asks of a model family; trainers/models/<family>_memory.py implements it.

A family builds its real architecture from its configs on the `meta` device and runs the passes the
trainer runs (training step, encoding, sampling); trainers/memory/estimate.py measures them and composes
the phases in the trainer's order. Nothing here knows a family by name. Importing this module imports no
torch: the estimate reads `Component` from here when its measurements are cached.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from trainers.config import TrainConfig
from trainers.models.families import Architecture, family_for

if TYPE_CHECKING:
    import torch

Role = Literal["denoiser", "text_encoder", "image_encoder"]


def precision_name(dtype: torch.dtype) -> str:
    """The config's name of a dtype (bf16, fp16, fp32), else torch's own."""
    from trainers.models.base import TORCH_DTYPES

    return {value: name for name, value in TORCH_DTYPES.items()}.get(dtype, str(dtype))


@dataclass(frozen=True)
class Component:
    """One frozen model part as the trainer holds it."""

    name: str
    role: Role
    params: int
    bytes: int  # parameters and buffers, at the precision the trainer keeps them in
    precision: str


class FamilyMemoryModel(ABC):
    """A family's architecture on the meta device, and the passes the trainer runs with it."""

    # where the passes' inputs are made: meta for the estimate; the tests run the same passes on real
    # CPU modules ("cpu") to check the meta measurement against what a real run holds
    tensor_device = "meta"

    def __init__(
        self, config: TrainConfig, device_type: str, architecture: Architecture | None = None
    ) -> None:
        """`architecture`: the component configs and their source, as the family's
        `estimate_architecture(config)` gives them (trainers/models/families.py; looked up when not given)."""
        self.config = config
        self.device_type = device_type
        family = family_for(config.model.family)
        self.architecture_configs, self.architecture_source = architecture or family.estimate_architecture(
            config
        )

    @abstractmethod
    def components(self) -> list[Component]:
        """The frozen components, with their weight bytes."""

    @abstractmethod
    def lora_targets(self) -> dict[str, tuple[str, str | list[str]]]:
        """The PEFT target_modules the adapter gives each component that trains a LoRA, with the config
        field that names them (for the message when nothing matches)."""

    def add_lora(self) -> dict[str, dict[str, torch.nn.Parameter]]:
        """Inject the configured LoRA into the meta modules, as the adapter does; the trainable parameters
        by name, per component (in fp32, as the trainer trains them)."""
        import torch
        from peft import LoraConfig, inject_adapter_in_model

        lora = self.config.lora
        params = {}
        for name, (field, modules) in self.lora_targets().items():
            module = getattr(self, name)
            config = LoraConfig(
                r=lora.rank,
                lora_alpha=lora.effective_alpha,
                lora_dropout=lora.dropout,
                target_modules=modules,
            )
            with torch.device(self.tensor_device):
                inject_adapter_in_model(config, module, adapter_name="default")
            params[name] = {n: p for n, p in module.named_parameters() if p.requires_grad}
            for p in params[name].values():
                p.data = p.data.float()  # cast_training_params: LoRA trains in fp32
            if not params[name]:
                raise ValueError(f"{field}: no module of the {name} matches {modules}")
        return params

    @abstractmethod
    def set_gradient_checkpointing(self, checkpoint: Callable) -> None:
        """Turn on gradient checkpointing where the adapter does, with `checkpoint` as the function."""

    @abstractmethod
    def training_loss(self, batch: int, height: int, width: int) -> torch.Tensor:
        """The loss of one micro-batch (text encoders run here only when they train or are not cached)."""

    @abstractmethod
    def encode_image(self, height: int, width: int) -> None:
        """One image to latents, without grad (caching, or each step when latents are not cached)."""

    @abstractmethod
    def encode_captions(self, batch: int) -> None:
        """Captions to text conditioning, without grad."""

    @abstractmethod
    def sample_step(self, height: int, width: int) -> None:
        """One denoising step of sampling (with classifier-free guidance), without grad."""

    @abstractmethod
    def decode(self, height: int, width: int) -> None:
        """Latents of one sample to pixels, without grad."""
