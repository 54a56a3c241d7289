"""The `[flux]` config section: what the Flux families need beyond the shared schema.

Kept free of model imports (pydantic only) so that trainers/config.py can import it without a cycle
(trainers.models imports trainers.config).
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

TimestepSampling = Literal["uniform", "logit_normal", "sigmoid"]
LossWeighting = Literal["none", "sigma_sqrt", "cosmap"]
TargetSet = Literal["attention", "attention+mlp", "all"]
Quantization = Literal["none", "int8", "float8"]


class FluxTrainingOptions(BaseModel):
    """What the Flux families need beyond the shared schema (the `[flux]` section of a run config)."""

    # strict like the rest of the run config (trainers/config.py's _Section): TOML has types
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    variant: Literal["auto", "dev", "schnell", "klein", "klein-base"] = Field(
        "auto",
        description="auto reads the checkpoint: Flux.1 with a guidance embedding is dev, without it schnell; "
        "Flux.2 Klein is distilled (klein) or not (klein-base) as its pipeline config says.",
    )
    components_path: str | None = Field(
        None,
        description="When model.path is a single transformer .safetensors: the repo id or diffusers folder "
        "the VAE, text encoders, tokenizers and scheduler come from.",
    )
    timestep_sampling: TimestepSampling = Field(
        "sigmoid",
        description="How sigma is drawn: uniform, logit_normal (logit_mean, logit_std) or sigmoid "
        "(sigmoid(sigmoid_scale * N(0, 1)), ai-toolkit's and musubi-tuner's default).",
    )
    logit_mean: float = Field(0.0, description="Mean of the normal behind logit_normal sampling.")
    logit_std: float = Field(1.0, gt=0, description="Std of the normal behind logit_normal sampling.")
    sigmoid_scale: float = Field(1.0, gt=0, description="Scale of the normal behind sigmoid sampling.")
    timestep_shift: Literal["resolution", "none"] | float = Field(
        "resolution",
        description="resolution: shift sigma towards noise by e^mu, mu linear in the image's token count "
        "(0.5 at 256 tokens, 1.15 at 4096: Flux.1's calculate_shift, musubi-tuner's flux_shift / "
        "flux2_shift); a number: that fixed shift (3.0 = SD3); none: no shift.",
    )
    loss_weighting: LossWeighting = Field(
        "none", description="Per-sample loss weight: none, sigma_sqrt (sigma^-2) or cosmap (SD3 paper)."
    )
    guidance: float | None = Field(
        None,
        description="Guidance value fed to Flux.1-dev's guidance embedding while training (empty = 1.0). "
        "Only dev has one: schnell and Klein reject it.",
    )
    lora_targets: TargetSet | list[str] = Field(
        "attention+mlp",
        description="Transformer modules that get a LoRA: a named set (attention, attention+mlp, all) or a "
        "list of module names (each matches that name or any module path ending in .<name>).",
    )
    quantize_base: Quantization = Field(
        "none", description="8-bit frozen transformer weights via torchao (int8 or float8 weight-only)."
    )
    quantize_text_encoders: Quantization = Field(
        "none", description="8-bit text encoders via torchao for encoding (they are frozen)."
    )
    sample_steps: int | None = Field(
        None, gt=0, description="Denoising steps of samples (empty = dev 28, schnell 4, klein 4, base 50)."
    )
    sample_guidance: float | None = Field(
        None,
        ge=0,
        description="Guidance of samples (empty = dev 3.5, schnell 0, klein 1 (none), klein-base 4).",
    )

    @field_validator("timestep_shift")
    @classmethod
    def _positive_shift(cls, value: str | float) -> str | float:
        if isinstance(value, float | int) and not isinstance(value, bool) and value <= 0:
            raise ValueError("a fixed shift must be > 0 (1.0 = no shift)")
        return value

    @model_validator(mode="after")
    def _guidance_only_for_dev(self) -> FluxTrainingOptions:
        if self.guidance is not None and self.variant in ("schnell", "klein", "klein-base"):
            raise ValueError(f"guidance: {self.variant} has no guidance embedding; leave guidance empty")
        return self

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _known_target_set(cls, value: object) -> object:
        # one message instead of pydantic's two (one per member of the union)
        if isinstance(value, str) and value not in get_args(TargetSet):
            raise ValueError(
                f"unknown target set {value!r}; use attention, attention+mlp, all, or a list of module names"
            )
        return value

    @field_validator("lora_targets")
    @classmethod
    def _non_empty_targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("give a named set (attention, attention+mlp, all) or at least one module name")
        return value
