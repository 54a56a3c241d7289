"""Flux.1 and Flux.2 Klein for the memory estimate: the real transformer, text encoders and VAE built from
their configs on the `meta` device, with the LoRA injected as flow_matching.py does, running the passes the
Flux adapters run. 8-bit bases are counted as torchao stores them: 1 byte per quantised Linear weight plus
one scale per output row (counted at 4 bytes); activations are measured on the unquantised meta layers."""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainers.config import TrainConfig
from trainers.memory.family import Component, FamilyMemoryModel, precision_name
from trainers.models.base import TORCH_DTYPES
from trainers.models.families import Flux2Family, FluxFamily
from trainers.models.flow_matching import flow_matching_loss, flux_options, noisy_latents

CLIP_TOKENS = 77
SCALE_BYTES = 4  # per output row of a quantised Linear (torchao keeps one scale per row)


class _FlowMemoryModel(FamilyMemoryModel):
    """What Flux.1 and Klein share: configs, weights (with 8-bit layers), LoRA, checkpointing, the loss."""

    family: str
    parts: tuple[str, ...]  # config file stems: transformer, vae, text encoders
    text_encoders: tuple[str, ...]

    def __init__(
        self, config: TrainConfig, device_type: str, architecture: tuple[dict[str, dict], str] | None = None
    ) -> None:
        super().__init__(config, device_type, architecture)
        self.options = flux_options(config)
        self.dtype = TORCH_DTYPES[config.training.precision]
        configs = self.architecture_configs
        with torch.device("meta"):
            self._build(configs)
        for name in self.parts:
            module = getattr(self, name)
            module.requires_grad_(False)
            module.eval()
            torch.nn.Module.to(module, self.dtype)  # the adapters load the whole pipeline in the run's dtype

    def _build(self, configs: dict[str, dict]) -> None:
        raise NotImplementedError

    @property
    def _is_demo(self) -> bool:
        """The tiny demo model (its tokenizers are shorter); measured configs carry no model path."""
        return self.architecture_source.startswith("the demo model")

    # ------------------------------------------------------------------ weights
    def components(self) -> list[Component]:
        roles = {"transformer": "denoiser", "vae": "image_encoder"}
        quantized = {"transformer": self.options.quantize_base}
        for name in self.text_encoders:
            roles[name] = "text_encoder"
            quantized[name] = self.options.quantize_text_encoders
        return [
            _component(
                name, roles[name], getattr(self, name), quantized.get(name, "none"), name == "transformer"
            )
            for name in self.parts
        ]

    # ------------------------------------------------------------------ LoRA and checkpointing
    def lora_targets(self) -> dict[str, tuple[str, str | list[str]]]:
        from trainers.models import transformer_target_modules

        lora = self.config.lora
        targets = {
            "transformer": ("flux.lora_targets", transformer_target_modules(self.family, self.options))
        }
        if lora.train_text_encoder:  # Flux.1's CLIP-L, as the adapter trains it
            targets["text_encoder"] = ("lora.text_encoder_target_modules", lora.text_encoder_target_modules)
        return targets

    def set_gradient_checkpointing(self, checkpoint: Callable) -> None:
        self.transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)
        self.transformer.train()  # diffusers checkpoints only in training mode
        if self.config.lora.train_text_encoder:
            self.text_encoder.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            self.text_encoder.train()

    # ------------------------------------------------------------------ passes
    def _text_encoded_each_step(self) -> bool:
        dataset, lora = self.config.dataset, self.config.lora
        return not (
            dataset.cache_text_embeddings and not dataset.shuffle_tags and not lora.train_text_encoder
        )

    def _latents(self, batch: int, height: int, width: int) -> torch.Tensor:
        """Cached latents as the adapter's encode_images returns them (fp32)."""
        raise NotImplementedError

    def _predict(
        self, noisy: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        raise NotImplementedError

    def _text(self, batch: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _cached_text(self, batch: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_loss(self, batch: int, height: int, width: int) -> torch.Tensor:
        x0 = self._latents(batch, height, width)
        noise = torch.randn(x0.shape, device=self.tensor_device)
        sigmas = torch.rand(batch, device=self.tensor_device)
        noisy = noisy_latents(x0, noise, sigmas)
        if self._text_encoded_each_step():
            with torch.set_grad_enabled(self.config.lora.train_text_encoder):
                text = self._text(batch)
        else:
            text = self._cached_text(batch)
        prediction = self._predict(noisy.to(self.dtype), sigmas, text)
        return flow_matching_loss(prediction, x0, noise, sigmas, self.options.loss_weighting).mean()

    def encode_captions(self, batch: int) -> None:
        with torch.no_grad():
            self._text(batch)

    def sample_step(self, height: int, width: int) -> None:
        # one prompt at a time; Klein's real CFG runs the negative prompt as a second pass of batch 1
        with torch.no_grad():
            x0 = self._latents(1, height, width)
            self._predict(x0.to(self.dtype), torch.rand(1, device=self.tensor_device), self._cached_text(1))

    def _zeros_ids(self, batch: int, tokens: int) -> torch.Tensor:
        return torch.zeros((batch, tokens), dtype=torch.long, device=self.tensor_device)


class FluxMemoryModel(_FlowMemoryModel):
    """Flux.1 dev / schnell: FluxTransformer2DModel, CLIP-L (pooled) + T5-XXL, the 16-channel VAE."""

    family = "flux"
    parts = FluxFamily.architecture_parts
    text_encoders = ("text_encoder", "text_encoder_2")

    def _build(self, configs: dict[str, dict]) -> None:
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        self.transformer = FluxTransformer2DModel.from_config(configs["transformer"])
        self.vae = AutoencoderKL.from_config(configs["vae"])
        self.text_encoder = CLIPTextModel(CLIPTextConfig(**_clean(configs["text_encoder"])))
        self.text_encoder_2 = T5EncoderModel(T5Config(**_clean(configs["text_encoder_2"])))

    @property
    def t5_tokens(self) -> int:
        from trainers.models.flux import T5_TOKENS

        if self._is_demo:
            from trainers.tiny_flux import T5_MAX_LENGTH

            return T5_MAX_LENGTH
        return T5_TOKENS["dev" if self.transformer.config.guidance_embeds else "schnell"]

    @property
    def _scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _latents(self, batch: int, height: int, width: int) -> torch.Tensor:
        shape = (batch, self.vae.config.latent_channels, height // self._scale, width // self._scale)
        return torch.randn(shape, device=self.tensor_device)

    def _text(self, batch: int) -> dict[str, torch.Tensor]:
        """FluxPipeline.encode_prompt: CLIP-L's pooled output and T5's last hidden state."""
        pooled = self.text_encoder(
            self._zeros_ids(batch, CLIP_TOKENS), output_hidden_states=False
        ).pooler_output
        embeds = self.text_encoder_2(self._zeros_ids(batch, self.t5_tokens), output_hidden_states=False)[0]
        return {"prompt_embeds": embeds.to(self.dtype), "pooled": pooled.to(self.dtype)}

    def _cached_text(self, batch: int) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeds": torch.randn(
                (batch, self.t5_tokens, self.transformer.config.joint_attention_dim),
                dtype=self.dtype,
                device=self.tensor_device,
            ),
            "pooled": torch.randn(
                (batch, self.transformer.config.pooled_projection_dim),
                dtype=self.dtype,
                device=self.tensor_device,
            ),
        }

    def _predict(
        self, noisy: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            batch, height // 2, width // 2, self.tensor_device, self.dtype
        )
        prompt_embeds = text["prompt_embeds"].to(self.dtype)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=self.tensor_device, dtype=self.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), 1.0, device=self.tensor_device, dtype=torch.float32)
        velocity = self.transformer(
            hidden_states=packed,
            timestep=sigmas.to(self.dtype),
            guidance=guidance,
            pooled_projections=text["pooled"].to(self.dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(velocity, height * self._scale, width * self._scale, self._scale)

    def encode_image(self, height: int, width: int) -> None:
        with torch.no_grad():
            pixels = torch.randn((1, 3, height, width), dtype=self.dtype, device=self.tensor_device)
            self.vae.encode(pixels).latent_dist.sample().float()

    def decode(self, height: int, width: int) -> None:
        shape = (1, self.vae.config.latent_channels, height // self._scale, width // self._scale)
        with torch.no_grad():
            self.vae.decode(torch.randn(shape, dtype=self.dtype, device=self.tensor_device))


class Flux2MemoryModel(_FlowMemoryModel):
    """Flux.2 Klein 4B / 9B: Flux2Transformer2DModel, Qwen3 (three hidden layers), the 32-channel VAE."""

    family = "flux2"
    parts = Flux2Family.architecture_parts
    text_encoders = ("text_encoder",)
    hidden_layers = (9, 18, 27)  # Flux2KleinPipeline's hidden_states_layers

    def _build(self, configs: dict[str, dict]) -> None:
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import Qwen3Config, Qwen3ForCausalLM

        self.transformer = Flux2Transformer2DModel.from_config(configs["transformer"])
        self.vae = AutoencoderKLFlux2.from_config(configs["vae"])
        self.text_encoder = Qwen3ForCausalLM(Qwen3Config(**_clean(configs["text_encoder"])))

    @property
    def qwen_tokens(self) -> int:
        from trainers.models.flux2 import QWEN_TOKENS

        if self._is_demo:
            from trainers.tiny_flux import QWEN_MAX_LENGTH

            return QWEN_MAX_LENGTH
        return QWEN_TOKENS

    @property
    def _scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _latents(self, batch: int, height: int, width: int) -> torch.Tensor:
        # patchified 2x2: 4x the VAE's channels at half its resolution
        factor = self._scale * 2
        shape = (batch, self.vae.config.latent_channels * 4, height // factor, width // factor)
        return torch.randn(shape, device=self.tensor_device)

    def _text(self, batch: int) -> dict[str, torch.Tensor]:
        """Flux2KleinPipeline._get_qwen3_prompt_embeds: three hidden layers, stacked then flattened."""
        ids = self._zeros_ids(batch, self.qwen_tokens)
        # the causal mask as transformers builds it from the pipeline's padding mask, given ready-made:
        # transformers inspects a 2-D mask's values, which meta tensors do not have
        size = (batch, 1, ids.shape[1], ids.shape[1])
        causal = torch.full(size, torch.finfo(self.dtype).min, dtype=self.dtype, device=ids.device).triu(1)
        output = self.text_encoder(
            input_ids=ids, attention_mask=causal, output_hidden_states=True, use_cache=False
        )
        out = torch.stack([output.hidden_states[k] for k in self.hidden_layers], dim=1).to(self.dtype)
        _, layers, tokens, hidden = out.shape
        return {"prompt_embeds": out.permute(0, 2, 1, 3).reshape(batch, tokens, layers * hidden)}

    def _cached_text(self, batch: int) -> dict[str, torch.Tensor]:
        shape = (batch, self.qwen_tokens, self.transformer.config.joint_attention_dim)
        return {"prompt_embeds": torch.randn(shape, dtype=self.dtype, device=self.tensor_device)}

    def _predict(
        self, noisy: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline

        batch, channels, height, width = noisy.shape
        packed = Flux2KleinPipeline._pack_latents(noisy)
        image_ids = Flux2KleinPipeline._prepare_latent_ids(noisy).to(self.tensor_device)
        prompt_embeds = text["prompt_embeds"].to(self.dtype)
        text_ids = Flux2KleinPipeline._prepare_text_ids(prompt_embeds).to(self.tensor_device)
        velocity = self.transformer(
            hidden_states=packed,
            encoder_hidden_states=prompt_embeds,
            timestep=sigmas.to(self.dtype),
            img_ids=image_ids,
            txt_ids=text_ids,
            guidance=None,
            return_dict=False,
        )[0]
        return velocity.permute(0, 2, 1).reshape(batch, channels, height, width)

    def encode_image(self, height: int, width: int) -> None:
        from diffusers import Flux2KleinPipeline

        with torch.no_grad():
            pixels = torch.randn((1, 3, height, width), dtype=self.dtype, device=self.tensor_device)
            latents = self.vae.encode(pixels).latent_dist.mode()
            Flux2KleinPipeline._patchify_latents(latents).float()

    def decode(self, height: int, width: int) -> None:
        shape = (1, self.vae.config.latent_channels, height // self._scale, width // self._scale)
        with torch.no_grad():
            self.vae.decode(torch.randn(shape, dtype=self.dtype, device=self.tensor_device))


def _clean(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in ("architectures", "torch_dtype", "_class_name")}


def _component(
    name: str, role: str, module: torch.nn.Module, quantization: str, blocks_only: bool
) -> Component:
    """Frozen weights at the run's dtype, with the Linear weights quantize_linears makes 8-bit at 1 byte."""
    quantized = {
        id(layer.weight)
        for layer_name, layer in module.named_modules()
        if quantization != "none"
        and isinstance(layer, torch.nn.Linear)
        and (not blocks_only or "transformer_blocks." in layer_name)
    }
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, torch.nn.Embedding)}
    frozen = [p for p in module.parameters() if not p.requires_grad]  # LoRA weights are counted apart
    total = sum(b.numel() * b.element_size() for b in module.buffers())
    for p in frozen:
        full = p.numel() * p.element_size()
        if id(p) not in quantized:
            total += full
            continue
        total += p.numel() + p.shape[0] * SCALE_BYTES
        if id(p) in embeddings:  # a tied lm_head: the embedding keeps its own full-precision copy
            total += full
    dtype = next(module.parameters()).dtype
    precision = precision_name(dtype)
    if quantization != "none":
        precision = f"{quantization} {'block Linears' if blocks_only else 'Linears'}, rest {precision}"
    return Component(
        name=name, role=role, params=sum(p.numel() for p in frozen), bytes=total, precision=precision
    )
