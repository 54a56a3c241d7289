"""Flux.1 dev / schnell: FluxTransformer2DModel on packed 2x2 latent patches, CLIP-L pooled + T5 text."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from trainers.models.families import FluxFamily
from trainers.models.flow_matching import FlowMatchingAdapter

# T5 tokens per caption: FluxPipeline's default for dev, the most schnell was distilled with
T5_TOKENS = {"dev": 512, "schnell": 256}
DEFAULT_TRAINING_GUIDANCE = 1.0  # what the diffusers Flux LoRA example trains dev with

_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."
_ATTENTION = (
    _DOUBLE + r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
    _SINGLE + r"attn\.(to_q|to_k|to_v)",
)
_MLP = (_DOUBLE + r"(ff|ff_context)\.net\.(0\.proj|2)", _SINGLE + r"(proj_mlp|proj_out)")
_MODULATION = (_DOUBLE + r"(norm1|norm1_context)\.linear", _SINGLE + r"norm\.linear")


def _regex(*parts: str) -> str:
    return "(" + "|".join(parts) + ")"


# PEFT full-matches a string target against each module name. "all" is every Linear inside the blocks
# (kohya's and ai-toolkit's default); embedders and the final layer are left out, as the peers do.
TARGET_SETS = {
    "attention": _regex(*_ATTENTION),
    "attention+mlp": _regex(*_ATTENTION, *_MLP),
    "all": _regex(*_ATTENTION, *_MLP, *_MODULATION),
}


class FluxAdapter(FluxFamily, FlowMatchingAdapter):  # the checks before loading are FluxFamily's
    transformer_class = FluxTransformer2DModel
    pipeline_class = FluxPipeline
    pipeline_name = "Flux.1 pipeline"

    @property
    def variant(self) -> str:
        """dev or schnell, from the checkpoint (a guidance embedding means dev)."""
        return "dev" if self.pipe.transformer.config.guidance_embeds else "schnell"

    def _check_variant(self) -> None:
        asked, found = self.options.variant, self.variant
        if asked not in ("auto", "dev", "schnell"):
            raise ValueError(f"flux.variant: {asked!r} is a Flux.2 variant; this Flux.1 model is {found}")
        if asked != "auto" and asked != found:
            raise ValueError(
                f"flux.variant: {asked!r} was asked but the checkpoint is {found} "
                f"({'has' if found == 'dev' else 'has no'} guidance embedding); set variant = 'auto'"
            )
        if self.options.guidance is not None and found != "dev":
            raise ValueError("flux.guidance: schnell has no guidance embedding; leave guidance empty")

    @property
    def max_sequence_length(self) -> int:
        return min(T5_TOKENS[self.variant], self.pipe.tokenizer_2.model_max_length)

    @property
    def training_guidance(self) -> float:
        return self.options.guidance if self.options.guidance is not None else DEFAULT_TRAINING_GUIDANCE

    def _sample_defaults(self) -> tuple[int, float]:
        return (28, 3.5) if self.variant == "dev" else (4, 0.0)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        vae = self.pipe.vae
        self._encoders_on_device(("vae",))
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.sample(generator)
        # (z - shift) * scale: the latent statistics Flux was trained on
        return ((latents - vae.config.shift_factor) * vae.config.scaling_factor).float()

    def encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self._encoders_on_device(self.text_encoders)
        with torch.set_grad_enabled(self.config.lora.train_text_encoder and torch.is_grad_enabled()):
            prompt_embeds, pooled, _ = self.pipe.encode_prompt(
                captions, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
            )
        return {"prompt_embeds": prompt_embeds, "pooled": pooled}

    def _encode_sample_prompt(self, prompt: str) -> dict[str, torch.Tensor]:
        self._encoders_on_device(self.text_encoders)
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(
            prompt, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def _sample_text(self, prompt: str) -> dict[str, torch.Tensor]:
        text = super()._sample_text(prompt)  # T5's embeddings: T5 never trains
        if (
            self.config.lora.train_text_encoder
        ):  # CLIP-L trains (and stays on the device): its pooled output now
            text["pooled_prompt_embeds"] = self.pipe._get_clip_prompt_embeds(
                prompt=prompt, device=self.device
            )
        return text

    def _token_count(self, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def _predict(
        self, noisy: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(
            batch, height // 2, width // 2, self.device, self.dtype
        )
        prompt_embeds = text["prompt_embeds"].to(self.device, self.dtype)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        transformer = self.pipe.transformer
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.training_guidance, device=self.device, dtype=torch.float32)
        velocity = transformer(
            hidden_states=packed,
            timestep=sigmas.to(self.dtype),  # the transformer takes t / 1000 = sigma
            guidance=guidance,
            pooled_projections=text["pooled"].to(self.device, self.dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(velocity, height * scale, width * scale, scale)

    def export_metadata(self) -> dict[str, str]:
        return {
            "ss_base_model_version": "flux1",  # what kohya's sd-scripts writes for Flux.1 LoRAs
            "ss_network_module": "networks.lora_flux",
            "modelspec.architecture": f"flux-1-{self.variant}/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        }
