"""SDXL for the memory estimate: the real UNet, text encoders and VAE built from their configs on the
`meta` device, with the LoRA injected as sdxl.py does, running the passes the SDXL adapter runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from trainers.config import DEMO_SCHEME, TrainConfig
from trainers.memory.family import PRECISION_NAMES, Component, FamilyMemoryModel
from trainers.models.base import TORCH_DTYPES

BUNDLED = Path(__file__).parent / "configs" / "sdxl"  # stabilityai/stable-diffusion-xl-base-1.0's configs
KNOWN_SDXL_REPOS = {
    "stabilityai/stable-diffusion-xl-base-1.0",
    "stabilityai/sdxl-turbo",
    "RunDiffusion/Juggernaut-XL-v9",
    "cagliostrolab/animagine-xl-3.1",
}
PARTS = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "vae": "vae"}
TOKENS = 77  # CLIP's context: captions are padded to it


def architecture_configs(model_path: str) -> tuple[dict[str, dict], str]:
    """The four component configs for `model.path`, and where they came from; reads no weights."""
    if model_path.startswith(DEMO_SCHEME):
        from trainers.tiny_models import CLIP_CONFIG, UNET_CONFIG, VAE_CONFIG

        configs = {"unet": UNET_CONFIG, "vae": VAE_CONFIG, "text_encoder": CLIP_CONFIG}
        return {**configs, "text_encoder_2": CLIP_CONFIG}, f"the demo model's own configs ({model_path})"
    folder = Path(model_path).expanduser()
    if folder.is_dir() and (folder / "model_index.json").is_file():
        return _read(lambda part: folder / part / "config.json"), f"{folder}'s own configs"
    if not folder.exists() and model_path.count("/") == 1:
        cached = _from_hub_cache(model_path)
        if cached is not None:
            return cached, f"{model_path}'s configs from the local Hugging Face cache"
        if model_path in KNOWN_SDXL_REPOS:
            return _bundled(), "the bundled SDXL base 1.0 configs (the model is not in the local cache)"
    what = "single-file checkpoint" if folder.is_file() else "model"
    return _bundled(), f"the bundled SDXL base 1.0 configs (assumed for this {what}: SDXL's architecture)"


def _read(path_of: Callable[[str], Path]) -> dict[str, dict]:
    return {part: json.loads(path_of(part).read_text(encoding="utf-8")) for part in PARTS}


def _bundled() -> dict[str, dict]:
    return _read(lambda part: BUNDLED / f"{part}.json")


def _from_hub_cache(repo: str) -> dict[str, dict] | None:
    from huggingface_hub import try_to_load_from_cache

    paths = {part: try_to_load_from_cache(repo, f"{part}/config.json") for part in PARTS}
    if not all(isinstance(path, str) for path in paths.values()):
        return None
    return _read(lambda part: Path(paths[part]))


class SDXLMemoryModel(FamilyMemoryModel):
    @staticmethod
    def architecture(config: TrainConfig) -> tuple[dict[str, dict], str]:
        return architecture_configs(config.model.path)

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
        precision=PRECISION_NAMES.get(dtype, str(dtype)),
    )
