"""Stable Diffusion XL: UNet with text_time conditioning, two CLIP text encoders, DDPM noise objective."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from diffusers.training_utils import cast_training_params, compute_snr
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image

from trainers.models.base import ModelAdapter, SampleConditioning, caption_length_warning
from trainers.models.families import TEXT_ENCODERS, SDXLFamily


class SDXLAdapter(SDXLFamily, ModelAdapter):  # the checks before loading are SDXLFamily's
    def load(self) -> None:
        path = self.config.model.path
        try:
            if self.is_single_file(path):
                pipe = StableDiffusionXLPipeline.from_single_file(path, dtype=self.dtype)
            else:
                pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=self.dtype)
        except (OSError, ValueError) as error:
            raise RuntimeError(
                f"model.path {path!r}: could not load an SDXL pipeline ({error}). Give a diffusers folder, a "
                "Hugging Face repo id already in the local cache, or a single-file SDXL .safetensors."
            ) from error
        pipe.set_progress_bar_config(disable=True)
        for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
            # over-long captions are counted and reported once each by encode_captions; this stops
            # transformers' own "sequence length is longer" warning at the tokenizer
            tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        self._long_captions_reported: set[str] = set()
        pipe.vae.to(dtype=torch.float32)  # the SDXL VAE overflows in fp16
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(False)
            module.eval()
        # the encoders go first (for the caches); the UNet takes their place in offload_encoders, so
        # both never need to fit on a small GPU at once
        pipe.vae.to(self.device)
        for name in TEXT_ENCODERS:
            getattr(pipe, name).to(self.device)
        self.pipe = pipe
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        prediction = self.config.model.prediction_type
        self.prediction_type = (
            self.noise_scheduler.config.prediction_type if prediction == "auto" else prediction
        )

    def cache_fingerprint(self) -> str:
        vae = self.pipe.vae.config
        key = f"sdxl|{Path(self.config.model.path).name}|{vae.latent_channels}|{vae.scaling_factor}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        vae = self.pipe.vae
        if next(vae.parameters()).device != self.device:
            vae.to(self.device)
        latents = vae.encode(pixels.to(self.device, torch.float32)).latent_dist.sample(generator)
        return latents * vae.config.scaling_factor

    def encode_captions(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self._report_long_captions(captions)
        for name in TEXT_ENCODERS:
            encoder = getattr(self.pipe, name)
            if next(encoder.parameters()).device != self.device:
                encoder.to(self.device)
        grad = self.config.lora.train_text_encoder and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad), _quiet_pipeline_warnings():
            prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(
                captions, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        return {"prompt_embeds": prompt_embeds, "pooled": pooled}

    def _report_long_captions(self, captions: list[str]) -> None:
        """One line per caption longer than CLIP's limit, the first time it is encoded."""
        tokenizer = self.pipe.tokenizer  # both SDXL tokenizers split text the same way
        for caption in captions:
            if caption in self._long_captions_reported:
                continue
            # tokenize() does not warn about length, and + 2 counts the start and end tokens
            tokens = len(tokenizer.tokenize(caption)) + 2
            if tokens > tokenizer.model_max_length:
                self._long_captions_reported.add(caption)
                message = caption_length_warning(caption, tokens, tokenizer.model_max_length)
                print(f"warning: {message}", file=sys.stderr)

    def offload_encoders(self) -> None:
        self.pipe.vae.to("cpu")
        if not self.config.lora.train_text_encoder:
            for name in TEXT_ENCODERS:
                getattr(self.pipe, name).to("cpu")
        self.pipe.unet.to(self.device)

    def add_lora(self) -> dict[str, list[torch.nn.Parameter]]:
        lora = self.config.lora
        targets = {"unet": lora.target_modules}
        if lora.train_text_encoder:
            targets.update({name: lora.text_encoder_target_modules for name in TEXT_ENCODERS})
        params = {}
        for name, modules in targets.items():
            module = getattr(self.pipe, name)
            config = LoraConfig(
                r=lora.rank,
                lora_alpha=lora.effective_alpha,
                lora_dropout=lora.dropout,
                target_modules=modules,
            )
            # peft's own injection: transformers' add_adapter wants a newer peft than diffusers pins
            inject_adapter_in_model(config, module, adapter_name="default")
            cast_training_params(module, dtype=torch.float32)  # base stays low precision, LoRA trains in fp32
            params[name] = [p for p in module.parameters() if p.requires_grad]
            if not params[name]:
                raise ValueError(f"lora.target_modules: no module of the {name} matches {modules}")
        return params

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        names = ("unet", *TEXT_ENCODERS) if self.config.lora.train_text_encoder else ("unet",)
        return {name: getattr(self.pipe, name) for name in names}

    def set_gradient_checkpointing(self) -> None:
        self.pipe.unet.enable_gradient_checkpointing()  # diffusers' default is the non-reentrant form
        if self.config.lora.train_text_encoder:
            for name in TEXT_ENCODERS:
                getattr(self.pipe, name).gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )

    def training_loss(
        self,
        latents: torch.Tensor,
        text: dict[str, torch.Tensor],
        conditioning: list[SampleConditioning],
        generator: torch.Generator,
    ) -> torch.Tensor:
        training = self.config.training
        latents = latents.to(self.device, torch.float32)
        batch = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        if training.noise_offset:  # shifts each channel's mean: lets the model learn very dark/bright images
            offset = torch.randn((batch, latents.shape[1], 1, 1), generator=generator, device=self.device)
            noise = noise + training.noise_offset * offset
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (batch,), generator=generator, device=self.device)
        return self._loss_at(latents, text, conditioning, noise, timesteps)

    def validation_loss(
        self,
        latents: torch.Tensor,
        text: dict[str, torch.Tensor],
        conditioning: list[SampleConditioning],
        noise: torch.Tensor,
        quantiles: torch.Tensor,
    ) -> torch.Tensor:
        # training draws timesteps uniformly from [0, steps): quantile q is timestep floor(q * steps)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = (quantiles.to(self.device) * steps).long().clamp(0, steps - 1)
        latents = latents.to(self.device, torch.float32)
        return self._loss_at(latents, text, conditioning, noise.to(self.device, torch.float32), timesteps)

    def _loss_at(
        self,
        latents: torch.Tensor,
        text: dict[str, torch.Tensor],
        conditioning: list[SampleConditioning],
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample loss of fp32 `latents` noised with `noise` to `timesteps`."""
        training = self.config.training
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = (
            noise
            if self.prediction_type == "epsilon"
            else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        )

        time_ids = torch.tensor(
            [[*c.original_size, *c.crop_top_left, *c.target_size] for c in conditioning],
            device=self.device,
            dtype=self.dtype,
        )
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            prediction = self.pipe.unet(
                noisy.to(self.dtype),
                timesteps,
                encoder_hidden_states=text["prompt_embeds"].to(self.device, self.dtype),
                added_cond_kwargs={
                    "text_embeds": text["pooled"].to(self.device, self.dtype),
                    "time_ids": time_ids,
                },
            ).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none")
        loss = loss.mean(dim=(1, 2, 3))
        if training.min_snr_gamma:  # Min-SNR: down-weight the easy, low-noise timesteps
            snr = compute_snr(self.noise_scheduler, timesteps)
            weight = snr.clamp(max=training.min_snr_gamma) / (
                snr if self.prediction_type == "epsilon" else snr + 1
            )
            loss = loss * weight
        return loss

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int) -> list[Image.Image]:
        sampling = self.config.sampling
        width = sampling.width or self.config.dataset.resolution
        height = sampling.height or self.config.dataset.resolution
        images = []
        try:
            if self.config.lora.train_text_encoder:  # both encoders train: encode with their current weights
                self._sample_texts = {}
            self._encode_sample_prompts(prompts)  # only prompts prepare_samples did not see
            if not self.config.lora.train_text_encoder:  # the UNet and the VAE alone while denoising
                for name in TEXT_ENCODERS:
                    getattr(self.pipe, name).to("cpu")
            self.pipe.vae.to(self.device)
            for index, prompt in enumerate(prompts):
                generator = torch.Generator(self.device).manual_seed(seed + index)
                with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                    latents = self.pipe(
                        **self._sample_text(prompt),
                        num_inference_steps=sampling.steps,
                        guidance_scale=sampling.guidance,
                        width=width,
                        height=height,
                        generator=generator,
                        output_type="latent",
                    ).images
                images.append(self._decode(latents)[0])
        finally:
            self.offload_encoders()
        return images

    def _encode_sample_prompt(self, prompt: str) -> dict[str, torch.Tensor | None]:
        for name in TEXT_ENCODERS:
            getattr(self.pipe, name).to(self.device)
        sampling = self.config.sampling
        with _quiet_pipeline_warnings():
            embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
                prompt,
                device=self.device,
                num_images_per_prompt=1,
                # the pipeline's own rule for classifier-free guidance
                do_classifier_free_guidance=sampling.guidance > 1
                and self.pipe.unet.config.time_cond_proj_dim is None,
                negative_prompt=sampling.negative_prompt or None,
            )
        return {
            "prompt_embeds": embeds,
            "negative_prompt_embeds": negative,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def _decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents to images with the VAE in fp32, outside autocast (it overflows in fp16)."""
        vae = self.pipe.vae
        decoded = vae.decode(latents.to(torch.float32) / vae.config.scaling_factor).sample
        return self.pipe.image_processor.postprocess(decoded, output_type="pil")

    def export_metadata(self) -> dict[str, str]:
        return {
            "ss_base_model_version": "sdxl_base_v1-0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        }


@contextlib.contextmanager
def _quiet_pipeline_warnings() -> Iterator[None]:
    """Hide the pipeline's "part of your input was truncated" warning, which repeats the whole cut-off text
    for each tokenizer; _report_long_captions says it once, in one line."""
    logger = logging.getLogger(StableDiffusionXLPipeline.__module__)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)
