"""SDXL for the memory estimate: the real UNet, text encoders and VAE built from their configs on the
`meta` device, with the LoRA injected as sdxl.py does, running the passes the SDXL adapter runs."""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainers.config import TrainConfig
from trainers.memory.family import Component, FamilyMemoryModel, precision_name
from trainers.models.base import TORCH_DTYPES

TOKENS = 77  # CLIP's context: captions are padded to it


class SDXLMemoryModel(FamilyMemoryModel):
    def __init__(
        self, config: TrainConfig, device_type: str, architecture: tuple[dict[str, dict], str] | None = None
    ) -> None:
        super().__init__(config, device_type, architecture)
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        configs = self.architecture_configs
        self.dtype = TORCH_DTYPES[config.training.precision]
        with torch.device("meta"):
            self.unet = UNet2DConditionModel.from_config(configs["unet"])
            # the SDXL adapter keeps the VAE in fp32 (it overflows in fp16)
            self.vae = AutoencoderKL.from_config(configs["vae"])
            self.text_encoder = CLIPTextModel(_clip_config(CLIPTextConfig, configs["text_encoder"]))
            self.text_encoder_2 = CLIPTextModelWithProjection(
                _clip_config(CLIPTextConfig, configs["text_encoder_2"])
            )
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            module.requires_grad_(False)
            module.eval()
        # torch's own .to: diffusers' warns about fp32 modules that only matter for real weights
        for module in (self.unet, self.text_encoder, self.text_encoder_2):
            torch.nn.Module.to(module, self.dtype)
        self._scale = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def components(self) -> list[Component]:
        roles = {
            "unet": "denoiser",
            "text_encoder": "text_encoder",
            "text_encoder_2": "text_encoder",
            "vae": "image_encoder",
        }
        return [_component(name, role, getattr(self, name)) for name, role in roles.items()]

    def lora_targets(self) -> dict[str, tuple[str, str | list[str]]]:
        lora = self.config.lora
        targets = {"unet": ("lora.target_modules", lora.target_modules)}
        if lora.train_text_encoder:
            for name in ("text_encoder", "text_encoder_2"):
                targets[name] = ("lora.text_encoder_target_modules", lora.text_encoder_target_modules)
        return targets

    def set_gradient_checkpointing(self, checkpoint: Callable) -> None:
        self.unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
        self.unet.train()  # diffusers checkpoints only in training mode
        if self.config.lora.train_text_encoder:
            for encoder in (self.text_encoder, self.text_encoder_2):
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                encoder.train()

    def _text(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """encode_prompt's outputs: the penultimate hidden states of both encoders, and the pooled one."""
        ids = torch.zeros((batch, TOKENS), dtype=torch.long, device=self.tensor_device)
        first = self.text_encoder(ids, output_hidden_states=True)
        second = self.text_encoder_2(ids, output_hidden_states=True)
        embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return embeds, second[0]

    def training_loss(self, batch: int, height: int, width: int) -> torch.Tensor:
        latent_shape = (batch, self.unet.config.in_channels, height // self._scale, width // self._scale)
        latents = torch.randn(latent_shape, device=self.tensor_device)
        noise = torch.randn(latent_shape, device=self.tensor_device)
        timesteps = torch.zeros(batch, dtype=torch.long, device=self.tensor_device)
        noisy = latents * 0.5 + noise * 0.5  # add_noise: fp32 latents
        if self._text_encoded_each_step():
            with torch.set_grad_enabled(self.config.lora.train_text_encoder):
                embeds, pooled = self._text(batch)
        else:
            embeds = torch.randn(
                (batch, TOKENS, self.unet.config.cross_attention_dim), device=self.tensor_device
            )
            pooled_dim = self.text_encoder_2.config.projection_dim
            pooled = torch.randn((batch, pooled_dim), device=self.tensor_device)
        time_ids = torch.randn((batch, 6), dtype=self.dtype, device=self.tensor_device)
        prediction = self.unet(
            noisy.to(self.dtype),
            timesteps,
            encoder_hidden_states=embeds.to(self.dtype),
            added_cond_kwargs={"text_embeds": pooled.to(self.dtype), "time_ids": time_ids},
        ).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float(), reduction="none")
        return loss.mean(dim=(1, 2, 3)).mean()

    def _text_encoded_each_step(self) -> bool:
        dataset, lora = self.config.dataset, self.config.lora
        fixed = not dataset.shuffle_tags and not lora.train_text_encoder
        return not (dataset.cache_text_embeddings and fixed)

    def encode_image(self, height: int, width: int) -> None:
        with torch.no_grad():
            pixels = torch.randn((1, 3, height, width), device=self.tensor_device)
            self.vae.encode(pixels).latent_dist.sample()

    def encode_captions(self, batch: int) -> None:
        with torch.no_grad():
            self._text(batch)

    def sample_step(self, height: int, width: int) -> None:
        shape = (2, self.unet.config.in_channels, height // self._scale, width // self._scale)  # CFG: 2
        with torch.no_grad():
            self.unet(
                torch.randn(shape, dtype=self.dtype, device=self.tensor_device),
                torch.zeros(2, dtype=torch.long, device=self.tensor_device),
                encoder_hidden_states=torch.randn(
                    (2, TOKENS, self.unet.config.cross_attention_dim),
                    dtype=self.dtype,
                    device=self.tensor_device,
                ),
                added_cond_kwargs={
                    "text_embeds": torch.randn(
                        (2, self.text_encoder_2.config.projection_dim),
                        dtype=self.dtype,
                        device=self.tensor_device,
                    ),
                    "time_ids": torch.randn((2, 6), dtype=self.dtype, device=self.tensor_device),
                },
            )

    def decode(self, height: int, width: int) -> None:
        shape = (1, self.vae.config.latent_channels, height // self._scale, width // self._scale)
        with torch.no_grad():
            self.vae.decode(torch.randn(shape, device=self.tensor_device))


def _clip_config(config_class, values: dict):
    return config_class(**{k: v for k, v in values.items() if k not in ("architectures", "torch_dtype")})


def _component(name: str, role: str, module: torch.nn.Module) -> Component:
    frozen = [p for p in module.parameters() if not p.requires_grad]  # LoRA weights are counted apart
    tensors = [*frozen, *module.buffers()]
    dtype = next(module.parameters()).dtype
    return Component(
        name=name,
        role=role,
        params=sum(p.numel() for p in frozen),
        bytes=sum(t.numel() * t.element_size() for t in tensors),
        precision=precision_name(dtype),
    )
