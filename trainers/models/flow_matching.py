"""Rectified-flow training shared by the Flux families: timestep sampling, shift, loss weighting, the objective.

The objective is the one in diffusers' examples/dreambooth/train_dreambooth_lora_flux*.py (flux-notes
§objective): x0 = normalised latents, sigma in (0, 1), x_t = (1 - sigma) x0 + sigma noise, the model
predicts the velocity noise - x0, MSE, optionally weighted per sample by a function of sigma.
`FluxTrainingOptions` (trainers/flux_options.py) is the config section these families read (`[flux]`).
"""

from __future__ import annotations

import hashlib
import math
from abc import abstractmethod
from pathlib import Path
from typing import Any

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image

from trainers.config import TrainConfig
from trainers.flux_options import FluxTrainingOptions, LossWeighting, Quantization
from trainers.models.base import ModelAdapter, SampleConditioning
from trainers.models.families import FlowMatchingFamily

# The ends of Flux.1's linear shift (FluxPipeline's calculate_shift, the scheduler configs' base/max
# shift and base/max image_seq_len): mu goes from 0.5 at 256 tokens to 1.15 at 4096 tokens.
SHIFT_BASE_TOKENS, SHIFT_MAX_TOKENS = 256, 4096
SHIFT_BASE_MU, SHIFT_MAX_MU = 0.5, 1.15


def flux_options(config: Any) -> FluxTrainingOptions:
    """The run's `[flux]` section, or the defaults when the schema has none (until it is plugged in)."""
    options = getattr(config, "flux", None)
    return options if options is not None else FluxTrainingOptions()


# --------------------------------------------------------------------------------------------------
# Timesteps
# --------------------------------------------------------------------------------------------------


def sample_base_sigmas(
    options: FluxTrainingOptions, batch: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Unshifted sigmas in (0, 1), one per sample, drawn from `generator`."""
    if options.timestep_sampling == "uniform":
        return torch.rand(batch, generator=generator, device=device)  # u ~ U(0, 1)
    if options.timestep_sampling == "logit_normal":
        # sigma = sigmoid(z), z ~ N(mean, std): SD3's logit-normal density
        normal = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(options.logit_mean + options.logit_std * normal)
    # sigma = sigmoid(scale * z), z ~ N(0, 1): logit-normal centred at 0.5 with std = scale
    return torch.sigmoid(options.sigmoid_scale * torch.randn(batch, generator=generator, device=device))


def quantile_base_sigmas(options: FluxTrainingOptions, quantiles: torch.Tensor) -> torch.Tensor:
    """The unshifted sigmas at `quantiles` in (0, 1) of the distribution sample_base_sigmas draws from
    (its inverse CDF), for evaluations at fixed points spread as training spreads them."""
    if options.timestep_sampling == "uniform":
        return quantiles
    normal = torch.special.ndtri(quantiles)  # the standard normal's quantile function
    if options.timestep_sampling == "logit_normal":
        return torch.sigmoid(options.logit_mean + options.logit_std * normal)
    return torch.sigmoid(options.sigmoid_scale * normal)


def resolution_mu(token_count: int) -> float:
    """mu linear in the packed image-token count: 0.5 at 256 tokens, 1.15 at 4096 (extrapolated beyond)."""
    slope = (SHIFT_MAX_MU - SHIFT_BASE_MU) / (SHIFT_MAX_TOKENS - SHIFT_BASE_TOKENS)
    return SHIFT_BASE_MU + slope * (token_count - SHIFT_BASE_TOKENS)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = s sigma / (1 + (s - 1) sigma): more time near pure noise for s > 1 (s = e^mu)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def shift_for(options: FluxTrainingOptions, token_count: int) -> float:
    """The shift s applied to sampled sigmas for an image of `token_count` packed tokens."""
    if options.timestep_shift == "none":
        return 1.0
    if options.timestep_shift == "resolution":
        return math.exp(resolution_mu(token_count))
    return float(options.timestep_shift)


def sample_sigmas(
    options: FluxTrainingOptions,
    batch: int,
    token_count: int,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """Training sigmas for one batch (all images of a batch share a bucket, hence a token count)."""
    return shift_sigmas(
        sample_base_sigmas(options, batch, generator, device), shift_for(options, token_count)
    )


# --------------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------------


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise: the straight path from data (sigma 0) to noise (sigma 1)."""
    sigma = sigmas.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / d sigma = noise - x0: what the transformer predicts."""
    return noise - x0


def loss_weights(weighting: LossWeighting, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight as a function of sigma."""
    if weighting == "sigma_sqrt":
        return sigmas.float() ** -2.0  # 1 / sigma^2 (named after sqrt(sigma) in the SD3 code)
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))  # SD3 paper's cosine-map density
    return torch.ones_like(sigmas)


def flow_matching_loss(
    prediction: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    weighting: LossWeighting,
) -> torch.Tensor:
    """Per-sample weighted MSE between the predicted and the true velocity."""
    target = velocity_target(x0, noise)
    error = (prediction.float() - target.float()) ** 2
    per_sample = error.reshape(error.shape[0], -1).mean(dim=1)
    return per_sample * loss_weights(weighting, sigmas).float()


# --------------------------------------------------------------------------------------------------
# The adapter base shared by Flux.1 and Flux.2
# --------------------------------------------------------------------------------------------------


class FlowMatchingAdapter(FlowMatchingFamily, ModelAdapter):
    """Loading, LoRA placement, quantisation, the loss and sampling that the Flux families share.

    A family supplies its `pipeline_class`, `encode_images`, `encode_captions`, `_predict` (noisy latents in the
    cached layout to a velocity in the same layout), `_token_count`, `max_sequence_length` and the sample
    defaults; its named LoRA target sets are its module's TARGET_SETS.
    """

    transformer_class: type  # the diffusers class (FlowMatchingFamily names it for the checks)

    def __init__(
        self, config: TrainConfig, device: torch.device, options: FluxTrainingOptions | None = None
    ) -> None:
        super().__init__(config, device)
        self.options = options if options is not None else flux_options(config)

    # ------------------------------------------------------------------ checks before loading
    @classmethod
    def check_device(cls, config: TrainConfig, device: torch.device) -> None:
        check_quantization(config.flux, device)

    # ------------------------------------------------------------------ family hooks
    pipeline_class: Any  # the family's diffusers pipeline (FluxPipeline, Flux2KleinPipeline)
    pipeline_name: str  # what a loading error calls it

    @abstractmethod
    def _check_variant(self) -> None:
        """Reject options the loaded variant cannot use, naming the field."""

    @abstractmethod
    def _predict(
        self, noisy: torch.Tensor, sigmas: torch.Tensor, text: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The transformer's velocity for `noisy` latents (cached layout), at `sigmas`."""

    @abstractmethod
    def _token_count(self, latents: torch.Tensor) -> int:
        """Packed image tokens of one latent of this batch (drives the resolution shift)."""

    @property
    @abstractmethod
    def max_sequence_length(self) -> int:
        """Text tokens per caption."""

    @abstractmethod
    def _sample_defaults(self) -> tuple[int, float]:
        """(steps, guidance) of samples when the options leave them empty."""

    # ------------------------------------------------------------------ loading
    def load(self) -> None:
        if self.options.quantize_base != "none" or self.options.quantize_text_encoders != "none":
            check_quantization(self.options, self.device)
        pipe = self._load_pipeline()
        pipe.set_progress_bar_config(disable=True)
        for name in ("transformer", "vae", *self.text_encoders):
            module = getattr(pipe, name)
            module.requires_grad_(False)
            module.eval()
        self.pipe = pipe
        self._check_variant()
        if self.options.quantize_text_encoders != "none":
            for name in self.text_encoders:
                quantize_linears(getattr(pipe, name), self.options.quantize_text_encoders)
        if self.options.quantize_base != "none":
            quantize_linears(pipe.transformer, self.options.quantize_base, blocks_only=True)
        # encoders first (for the caches); the transformer takes their place in offload_encoders
        pipe.vae.to(self.device)
        for name in self.text_encoders:
            getattr(pipe, name).to(self.device)

    def _load_pipeline(self) -> Any:
        """The family's pipeline from model.path (or the single file + components_path), in self.dtype."""
        single = self._single_file_source()
        try:
            if single is not None:
                file, rest = single
                transformer = self.transformer_class.from_single_file(
                    file, config=rest, subfolder="transformer", dtype=self.dtype
                )
                return self.pipeline_class.from_pretrained(rest, transformer=transformer, dtype=self.dtype)
            return self.pipeline_class.from_pretrained(self.config.model.path, dtype=self.dtype)
        except (OSError, ValueError, KeyError) as error:
            raise self._load_error(error, self.pipeline_name) from error

    def _load_error(self, error: Exception, what: str) -> RuntimeError:
        return RuntimeError(
            f"model.path {self.config.model.path!r}: could not load a {what} ({error}). Give a diffusers "
            "folder, a Hugging Face repo id already in the local cache, or a single transformer "
            ".safetensors with flux.components_path naming the folder/repo the rest comes from."
        )

    def _single_file_source(self) -> tuple[str, str] | None:
        """(transformer file, components folder/repo) when model.path is a single file, else None."""
        path = self.config.model.path
        if not self.is_single_file(path):
            return None
        if not self.options.components_path:
            raise ValueError(
                f"flux.components_path: model.path {path!r} is a single transformer file; name the diffusers "
                "folder or repo id that the VAE, text encoders and tokenizers come from"
            )
        return path, self.options.components_path

    def cache_fingerprint(self) -> str:
        vae = self.pipe.vae.config
        source = f"{Path(self.config.model.path).name}|{self.options.components_path or ''}"
        key = f"{self.family}|{source}|{vae.latent_channels}|{self.max_sequence_length}"
        key += f"|{self.options.quantize_text_encoders}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def offload_encoders(self) -> None:
        self.pipe.vae.to("cpu")
        self._frozen_text_encoders_off()
        self.pipe.transformer.to(self.device)

    def _frozen_text_encoders_off(self) -> None:
        for name in self.text_encoders:
            if not (name == "text_encoder" and self.config.lora.train_text_encoder):
                getattr(self.pipe, name).to("cpu")

    def _encoders_on_device(self, names: tuple[str, ...]) -> None:
        for name in names:
            module = getattr(self.pipe, name)
            if next(module.parameters()).device != self.device:
                module.to(self.device)

    # ------------------------------------------------------------------ LoRA
    def lora_target_modules(self) -> str | list[str]:
        """PEFT target_modules of the transformer: a named set's regex, or the raw module names."""
        from trainers.models import transformer_target_modules

        return transformer_target_modules(self.family, self.options)

    def add_lora(self) -> dict[str, list[torch.nn.Parameter]]:
        lora = self.config.lora
        targets: dict[str, str | list[str]] = {"transformer": self.lora_target_modules()}
        if lora.train_text_encoder:
            targets["text_encoder"] = lora.text_encoder_target_modules
        params = {}
        for name, modules in targets.items():
            module = getattr(self.pipe, name)
            config = LoraConfig(
                r=lora.rank,
                lora_alpha=lora.effective_alpha,
                lora_dropout=lora.dropout,
                target_modules=modules,
            )
            try:
                inject_adapter_in_model(config, module, adapter_name="default")
            except ValueError as error:  # peft: "Target modules ... not found in the base model"
                field = "flux.lora_targets" if name == "transformer" else "lora.text_encoder_target_modules"
                raise ValueError(f"{field}: no module of the {name} matches {modules} ({error})") from error
            cast_training_params(module, dtype=torch.float32)  # base stays low precision, LoRA trains in fp32
            params[name] = [p for p in module.parameters() if p.requires_grad]
        return params

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        names = ("transformer", "text_encoder") if self.config.lora.train_text_encoder else ("transformer",)
        return {name: getattr(self.pipe, name) for name in names}

    def set_gradient_checkpointing(self) -> None:
        self.pipe.transformer.enable_gradient_checkpointing()  # diffusers' default is non-reentrant
        if self.config.lora.train_text_encoder:
            self.pipe.text_encoder.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )

    # ------------------------------------------------------------------ objective
    def training_loss(
        self,
        latents: torch.Tensor,
        text: dict[str, torch.Tensor],
        conditioning: list[SampleConditioning] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-sample flow-matching loss; `conditioning` (SDXL's micro-conditioning) is not used."""
        if generator is None:
            raise ValueError("training_loss needs the run's generator (noise and timesteps come from it)")
        x0 = latents.to(self.device, torch.float32)
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        sigmas = sample_sigmas(self.options, x0.shape[0], self._token_count(x0), generator, self.device)
        return self._loss_at(x0, text, noise, sigmas)

    def validation_loss(
        self,
        latents: torch.Tensor,
        text: dict[str, torch.Tensor],
        conditioning: list[SampleConditioning] | None,
        noise: torch.Tensor,
        quantiles: torch.Tensor,
    ) -> torch.Tensor:
        """Per-sample loss at the sigmas at `quantiles` of the training distribution (shift included)."""
        x0 = latents.to(self.device, torch.float32)
        base = quantile_base_sigmas(self.options, quantiles.to(self.device, torch.float32))
        sigmas = shift_sigmas(base, shift_for(self.options, self._token_count(x0)))
        return self._loss_at(x0, text, noise.to(self.device, torch.float32), sigmas)

    def _loss_at(
        self, x0: torch.Tensor, text: dict[str, torch.Tensor], noise: torch.Tensor, sigmas: torch.Tensor
    ) -> torch.Tensor:
        noisy = noisy_latents(x0, noise, sigmas)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            prediction = self._predict(noisy.to(self.dtype), sigmas, text)
        return flow_matching_loss(prediction, x0, noise, sigmas, self.options.loss_weighting)

    # ------------------------------------------------------------------ samples
    def _sample_settings(self) -> tuple[int, float]:
        """(steps, guidance) of samples: the options', else the variant's defaults."""
        default_steps, default_guidance = self._sample_defaults()
        guidance = self.options.sample_guidance
        return self.options.sample_steps or default_steps, default_guidance if guidance is None else guidance

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int) -> list[Image.Image]:
        sampling = self.config.sampling
        steps, guidance = self._sample_settings()
        width = sampling.width or self.config.dataset.resolution
        height = sampling.height or self.config.dataset.resolution
        images = []
        try:
            self._encode_sample_prompts(prompts)  # only prompts prepare_samples did not see
            self._frozen_text_encoders_off()  # the denoiser and the VAE alone on the device while denoising
            self._encoders_on_device(("vae",))
            for index, prompt in enumerate(prompts):
                generator = torch.Generator(self.device).manual_seed(seed + index)
                with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                    text = self._sample_text(prompt)
                    images += self.pipe(
                        **text,
                        num_inference_steps=steps,
                        guidance_scale=guidance,
                        width=width,
                        height=height,
                        generator=generator,
                        max_sequence_length=self.max_sequence_length,
                    ).images
        finally:
            self.offload_encoders()
        return images


# --------------------------------------------------------------------------------------------------
# 8-bit base weights (torchao)
# --------------------------------------------------------------------------------------------------


def check_quantization(options: FluxTrainingOptions, device: torch.device) -> None:
    """Raise naming the field if torchao is missing or the device cannot run the chosen 8-bit format."""
    for field in ("quantize_base", "quantize_text_encoders"):
        kind = getattr(options, field)
        if kind == "none":
            continue
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise ValueError(
                f"flux.{field} = {kind!r} needs torchao: pip install torchao==0.18.0 (in requirements.txt)"
            ) from None
        if kind == "float8" and device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            if (major, minor) < (8, 9):
                raise ValueError(
                    f"flux.{field} = 'float8' needs a GPU with compute capability 8.9 or newer (Ada, Hopper); "
                    f"this one has {major}.{minor}: use 'int8'"
                )


def quantize_linears(module: torch.nn.Module, kind: Quantization, blocks_only: bool = False) -> None:
    """Weight-only 8-bit `module`'s Linear layers in place (only those in transformer blocks if asked)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    def selected(layer: torch.nn.Module, name: str) -> bool:
        return isinstance(layer, torch.nn.Linear) and (not blocks_only or "transformer_blocks." in name)

    quantize_(
        module, Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig(), filter_fn=selected
    )
