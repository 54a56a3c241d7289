"""Flux.2 Klein (4B / 9B): Flux2Transformer2DModel on patchified, BatchNorm-normalised latents, Qwen3 text."""

from __future__ import annotations

import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

from trainers.models.families import Flux2Family
from trainers.models.flow_matching import FlowMatchingAdapter

QWEN_TOKENS = 512  # Flux2KleinPipeline's tokenizer_max_length

_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."
# The single blocks fuse attention and MLP in two layers (to_qkv_mlp_proj in, to_out out), so "attention"
# takes both, as the diffusers Klein LoRA example does.
_ATTENTION = (
    _DOUBLE + r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
    _SINGLE + r"attn\.(to_qkv_mlp_proj|to_out)",
)
_MLP = (_DOUBLE + r"(ff|ff_context)\.(linear_in|linear_out)",)
# Klein's modulation is shared by all blocks of a kind: one layer each, outside the blocks
_MODULATION = (
    r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear",
)


def _regex(*parts: str) -> str:
    return "(" + "|".join(parts) + ")"


TARGET_SETS = {
    "attention": _regex(*_ATTENTION),
    "attention+mlp": _regex(*_ATTENTION, *_MLP),
    "all": _regex(*_ATTENTION, *_MLP, *_MODULATION),
}

# inner dim (heads x head dim) -> the names the ecosystem gives the model
_KLEIN_SIZES = {3072: "4b", 4096: "9b"}


class Flux2Adapter(Flux2Family, FlowMatchingAdapter):  # the checks before loading are Flux2Family's
    transformer_class = Flux2Transformer2DModel
    pipeline_class = Flux2KleinPipeline
    pipeline_name = "Flux.2 Klein pipeline"

    @property
    def variant(self) -> str:
        """klein (step-distilled) or klein-base, from the pipeline config."""
        return "klein" if self.pipe.config.is_distilled else "klein-base"

    @property
    def size(self) -> str:
        """4b or 9b (tiny test models count as 4b)."""
        config = self.pipe.transformer.config
        return _KLEIN_SIZES.get(config.num_attention_heads * config.attention_head_dim, "4b")

    def _check_variant(self) -> None:
        asked = self.options.variant
        if asked in ("dev", "schnell"):
            raise ValueError(
                f"flux.variant: {asked!r} is a Flux.1 variant; this Flux.2 model is {self.variant}"
            )
        if asked != "auto" and asked != self.variant:
            raise ValueError(f"flux.variant: {asked!r} was asked but the checkpoint is {self.variant}")
        if self.options.guidance is not None:
            raise ValueError("flux.guidance: Klein has no guidance embedding; leave guidance empty")
        if self.config.lora.train_text_encoder:
            raise ValueError(
                "lora.train_text_encoder: Flux.2 trains no text-encoder LoRA (Qwen3); turn it off"
            )

    @property
    def max_sequence_length(self) -> int:
        return min(QWEN_TOKENS, self.pipe.tokenizer.model_max_length)

    def _sample_defaults(self) -> tuple[int, float]:
        # distilled Klein samples in 4 steps without CFG; the base model as its model card says
        return (4, 1.0) if self.variant == "klein" else (50, 4.0)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        vae = self.pipe.vae
        self._encoders_on_device(("vae",))
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()  # Klein trains on the mode
        latents = Flux2KleinPipeline._patchify_latents(latents)  # 2x2 patches -> 4x channels
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
        return ((latents - mean) / std).float()  # the VAE's BatchNorm statistics normalise the latents

    def encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self._encoders_on_device(self.text_encoders)
        prompt_embeds, _ = self.pipe.encode_prompt(
            captions, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": prompt_embeds}

    def _encode_sample_prompt(self, prompt: str) -> dict[str, torch.Tensor]:
        self._encoders_on_device(self.text_encoders)

        def encode(text: str) -> torch.Tensor:
            return self.pipe.encode_prompt(
                prompt=text, device=self.device, max_sequence_length=self.max_sequence_length
            )[0]

        embeds = {"prompt_embeds": encode(prompt)}
        _, guidance = self._sample_settings()
        if guidance > 1 and not self.pipe.config.is_distilled:  # the pipeline's CFG, with an empty negative
            embeds["negative_prompt_embeds"] = encode("")
        return embeds

    def _token_count(self, latents: torch.Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1]  # already patchified: one token per position

    def _predict(
        self, noisy: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        batch, channels, height, width = noisy.shape
        packed = Flux2KleinPipeline._pack_latents(noisy)  # (B, H*W, C)
        image_ids = Flux2KleinPipeline._prepare_latent_ids(noisy).to(self.device)  # (T, H, W, L) per token
        prompt_embeds = text["prompt_embeds"].to(self.device, self.dtype)
        text_ids = Flux2KleinPipeline._prepare_text_ids(prompt_embeds).to(self.device)  # (0, 0, 0, l)
        velocity = self.pipe.transformer(
            hidden_states=packed,
            encoder_hidden_states=prompt_embeds,
            timestep=sigmas.to(self.dtype),  # the transformer takes t / 1000 = sigma
            img_ids=image_ids,
            txt_ids=text_ids,
            guidance=None,
            return_dict=False,
        )[0]
        return velocity.permute(0, 2, 1).reshape(batch, channels, height, width)

    def export_metadata(self) -> dict[str, str]:
        return {
            "ss_base_model_version": f"flux2_klein_{self.size}",  # what ai-toolkit writes for Klein
            "ss_network_module": "networks.lora_flux_2",  # musubi-tuner's Flux.2 LoRA module
            "modelspec.architecture": f"Flux.2-klein-{self.size}/lora",  # musubi-tuner's name
            "modelspec.implementation": "https://github.com/black-forest-labs/flux2",
        }
