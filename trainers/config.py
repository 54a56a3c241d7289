"""The training-run config: schema, TOML loading, `--set` overrides, and error messages people can act on.

Everything a user can set lives here; the UI writes these files and the trainer reads them.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainers.flux_options import FluxTrainingOptions

DEMO_SCHEME = "demo://"  # demo://tiny-sdxl, tiny-flux, tiny-klein and shapes are generated on first use
MAX_ASPECT = 8.0  # wider buckets are useless for SDXL, and the bucket table grows with the aspect
MAX_NAME_LENGTH = 100


class ConfigError(ValueError):
    """One or more problems with a config, one per line, each naming the field."""

    def __init__(self, problems: list[str], data: dict[str, Any] | None = None) -> None:
        self.problems = problems
        self.data = data  # the values that failed validation, so their paths can still be checked
        super().__init__("\n".join(problems))


class _Section(BaseModel):
    # strict: TOML has types, so "100" for a number is a mistake to report, not to coerce (ints still
    # pass for float fields); no nan/inf anywhere, since a non-finite number only fails much later
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class ModelConfig(_Section):
    family: Literal["sdxl", "flux", "flux2"] = Field(
        "sdxl", description="Model family: sdxl, flux (Flux.1 dev / schnell) or flux2 (Flux.2 Klein)."
    )
    path: str = Field(
        description="Hugging Face repo id, local diffusers folder, or single-file .safetensors checkpoint "
        "(Flux: a transformer file, with flux.components_path for the rest); demo://tiny-sdxl, "
        "demo://tiny-flux and demo://tiny-klein build tiny models for trying things out."
    )
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = Field(
        "auto", description="What the model predicts; auto reads the model's scheduler config."
    )


class DatasetConfig(_Section):
    path: str = Field(
        description="Folder of images with same-named .txt captions (kohya N_concept folders work)."
    )
    caption_extension: str = Field(".txt", description="Extension of the caption file next to each image.")
    cache_dir: str | None = Field(
        None,
        description="Folder for the latent and text caches; empty means a hidden .ppsf-cache folder inside "
        "the dataset.",
    )
    trigger_word: str | None = Field(None, description="Added as the first tag of every caption.")
    shuffle_tags: bool = Field(
        False, description="Shuffle comma-separated tags each time (keeps the first N)."
    )
    keep_tokens: int = Field(0, ge=0, description="Tags kept in place when shuffling.")
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0, description="Probability of an empty caption.")
    resolution: int = Field(1024, description="Training area is resolution²; must be a multiple of 64.")
    max_aspect: float = Field(2.0, ge=1.0, le=MAX_ASPECT, description="Widest bucket aspect ratio.")
    no_upscale: bool = Field(True, description="Never upscale small images to a bucket; use their own size.")
    crop: Literal["center", "random"] = Field(
        "center", description="How images are cropped to their bucket; random crops are not cached."
    )
    cache_latents: bool = Field(True, description="Encode images once and reuse the latents from disk.")
    cache_text_embeddings: bool = Field(
        True, description="Encode captions once (only when captions are fixed and text encoders frozen)."
    )

    validation: str | float | None = Field(
        None,
        description="Images to measure the validation loss on: a folder laid out like the dataset, or a "
        "fraction (0 < x < 1) of the dataset held out from training (the same images every run).",
    )

    @field_validator("validation")
    @classmethod
    def _validation_source(cls, value: str | float | None) -> str | float | None:
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError("a held-out fraction must be between 0 and 1 (e.g. 0.1), or give a folder")
        if isinstance(value, str) and not value.strip():
            raise ValueError("must name a folder of validation images, or be a fraction such as 0.1")
        return value

    @field_validator("resolution")
    @classmethod
    def _multiple_of_64(cls, value: int) -> int:
        if value <= 0 or value % 64:
            raise ValueError(f"must be a positive multiple of 64; try {max(64, round(value / 64) * 64)}")
        return value

    @field_validator("caption_extension")
    @classmethod
    def _extension(cls, value: str) -> str:
        if value.strip().strip(".") == "" or any(c in value for c in "/\\*?"):
            raise ValueError('must name the caption files\' extension, e.g. ".txt" or ".caption"')
        return value


class LoraConfig(_Section):
    rank: int = Field(32, gt=0, description="LoRA rank (dim).")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; empty means equal to rank (scale 1).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path while training.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"],
        description="UNet module names that get a LoRA.",
    )
    train_text_encoder: bool = Field(False, description="Also train LoRAs on both text encoders.")
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        description="Text-encoder module names that get a LoRA when text encoders train.",
    )

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class TrainingConfig(_Section):
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    epochs: int | None = Field(None, gt=0, description="Or stop after this many passes over the dataset.")
    batch_size: int = Field(1, gt=0, description="Images per step (all from the same bucket).")
    gradient_accumulation: int = Field(
        1, gt=0, description="Micro-batches per step (not with fused backward)."
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="Frozen base weights and autocast; LoRA weights stay fp32, the VAE runs in fp32."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less VRAM, ~30% slower."
    )
    seed: int = Field(42, description="Seed of LoRA init, data order, noise and timesteps.")
    noise_offset: float = Field(
        0.0, ge=0.0, description="Per-channel noise shift (e.g. 0.03) for darker/brighter images."
    )
    min_snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting (5 is common).")
    tensorboard: bool = Field(False, description="Also log the scalars to runs/<name>/tensorboard.")

    @model_validator(mode="after")
    def _one_length(self) -> TrainingConfig:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of training.max_steps and training.epochs")
        return self


class OptimizerConfig(_Section):
    """ProdigyPlusScheduleFree's arguments; d is the learning rate Prodigy finds, lr only multiplies it."""

    lr: float = Field(1.0, gt=0, description="Multiplier on Prodigy's d; keep 1.0.")
    text_encoder_lr: float = Field(1.0, gt=0, description="lr multiplier of the text-encoder groups.")
    betas: tuple[float, float] = Field(
        (0.9, 0.99), description="beta1: schedule-free interpolation; beta2: second-moment decay."
    )
    beta3: float | None = Field(None, description="Decay of Prodigy's d statistics; empty means sqrt(beta2).")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay (0 is usual for LoRA).")
    weight_decay_by_lr: bool = Field(True, description="Scale weight decay by the step size, as AdamW does.")
    use_bias_correction: bool = Field(False, description="Bias-corrected beta2; damps d early on.")
    d0: float = Field(1e-6, gt=0, description="Starting d; raise to 1e-5 if d stays flat.")
    d_coef: float = Field(1.0, gt=0, description="Multiplier on the d estimate: the knob to tune.")
    prodigy_steps: int | float | Literal["auto"] = Field(
        0,
        description="Freeze d after N steps (int), after a fraction of the run (0 < x < 1), or 'auto' "
        "once d stops growing. 0 = never.",
    )
    eps: float | Literal["atan2"] = Field(
        1e-8, description='"atan2" selects Adam-atan2 (eps=None in Python).'
    )
    split_groups: bool = Field(True, description="One d per parameter group (UNet, each text encoder).")
    split_groups_mean: bool = Field(
        True, description="Step every group with the harmonic mean of the groups' d."
    )
    factored: bool = Field(True, description="Adafactor-style factored second moment: about half the memory.")
    factored_fp32: bool = Field(True, description="Keep factored statistics in fp32.")
    fused_back_pass: bool = Field(True, description="Step inside backward and free each gradient at once.")
    use_stableadamw: bool = Field(
        True, description="Scale down updates whose RMS is large (built-in clipping)."
    )
    use_muon_pp: bool = Field(False, description="Experimental: orthogonalise matrix gradients (Muon).")
    use_cautious: bool = Field(
        False, description="Experimental: only step where update and step agree in sign."
    )
    use_grams: bool = Field(False, description="Experimental: step magnitude with the update's sign.")
    use_adopt: bool = Field(
        False, description="Experimental: normalise by the second moment before this gradient."
    )
    use_speed: bool = Field(
        False, description="Experimental: SPEED's d rule (reported erratic on diffusion)."
    )
    use_orthograd: bool = Field(False, description="Remove the update's component along the weights.")
    use_focus: bool = Field(False, description="Experimental: FOCUS sign update; needs factored = false.")
    d_limiter: bool = Field(False, description="Let d grow at most 2^0.25 per step.")
    schedulefree_c: float = Field(
        0.0, ge=0.0, description="Refined averaging strength (6-12 short runs, 50-200 long); 0 = off."
    )
    stochastic_rounding: bool = Field(True, description="Round bf16 weights stochastically (unbiased).")

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_from_list(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value  # TOML and JSON have no tuples

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        for index, beta in enumerate(value):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"beta{index + 1} = {beta} must be in [0, 1), e.g. betas = [0.9, 0.99]")
        return value

    @field_validator("prodigy_steps")
    @classmethod
    def _prodigy_steps(cls, value: int | float | str) -> int | float | str:
        if isinstance(value, float) and not value.is_integer() and not 0 < value < 1:
            raise ValueError("a fraction of the run must be between 0 and 1 (e.g. 0.25)")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and value < 0:
            raise ValueError("must be >= 0 (0 = never freeze d)")
        return value

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Constructor arguments for ProdigyPlusScheduleFree (prodigy_steps resolved by the trainer)."""
        kwargs = self.model_dump(exclude={"text_encoder_lr", "prodigy_steps"})
        kwargs["eps"] = None if self.eps == "atan2" else self.eps
        return kwargs


class SamplingConfig(_Section):
    prompts: list[str] = Field(default_factory=list, description="One image per prompt at each sample step.")
    negative_prompt: str = Field("", description="Negative prompt for every sample.")
    every_n_steps: int = Field(0, ge=0, description="0 = only at the end.")
    seed: int = Field(42, description="Sample i uses seed + i, the same at every sample step.")
    steps: int = Field(25, gt=0, description="Denoising steps per sample.")
    guidance: float = Field(6.0, ge=0.0, description="Classifier-free guidance scale of the samples.")
    width: int | None = Field(None, description="Defaults to dataset.resolution.")
    height: int | None = Field(None, description="Defaults to dataset.resolution.")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        # the VAE halves the image three times: other sizes fail only when the first sample is drawn
        if value is not None and (value <= 0 or value % 8):
            raise ValueError(f"must be a positive multiple of 8; try {max(8, round(value / 8) * 8)}")
        return value


class ValidationConfig(_Section):
    """The validation loss of the averaged weights x (what is exported), on dataset.validation's images."""

    every_n_steps: int = Field(0, ge=0, description="Validate every N steps; 0 = only at the end.")
    timesteps: int = Field(
        4, gt=0, le=64, description="Fixed timesteps per image, spread over the training schedule."
    )


class HealthConfig(_Section):
    """When the optimizer-health warnings speak up (the other thresholds are fixed, see trainers/health.py)."""

    text_encoder_d_ratio: float = Field(
        10.0,
        gt=1.0,
        description="Warn when a text encoder's step size exceeds the denoiser's this many times.",
    )


class SavingConfig(_Section):
    every_n_steps: int = Field(250, ge=0, description="Checkpoint (LoRA + optimizer state) every N steps.")
    keep_last: int = Field(
        3, gt=0, description="Checkpoints kept; older ones are deleted, except the best validation step's."
    )
    formats: list[Literal["kohya", "diffusers"]] = Field(
        default_factory=lambda: ["kohya", "diffusers"],
        description="kohya for ComfyUI and A1111/Forge; diffusers for pipe.load_lora_weights.",
    )
    dtype: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="Precision of exported LoRA files.")


class TrainConfig(_Section):
    name: str = Field(description="Run name: the run folder is output_dir/name.")
    output_dir: str = Field("runs", description="Folder that holds the run folders.")
    model: ModelConfig
    dataset: DatasetConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    saving: SavingConfig = Field(default_factory=SavingConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    flux: FluxTrainingOptions = Field(
        default_factory=FluxTrainingOptions, description="Flux.1 / Flux.2 options (model.family flux, flux2)."
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a folder name, not empty or only spaces")
        if len(value) > MAX_NAME_LENGTH:
            raise ValueError(f"is {len(value)} characters long; keep it to {MAX_NAME_LENGTH} or fewer")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("contains a control character (NUL, tab, newline...); use a plain folder name")
        if any(c in value for c in '/\\:*?"<>|') or value.startswith("."):
            raise ValueError("must be a plain folder name (no slashes or special characters)")
        return value

    @model_validator(mode="after")
    def _compatible(self) -> TrainConfig:
        if self.optimizer.fused_back_pass and self.training.gradient_accumulation > 1:
            raise ValueError(
                "optimizer.fused_back_pass steps inside each backward pass, so it cannot accumulate gradients: "
                "set training.gradient_accumulation = 1 (raise training.batch_size instead) or turn "
                "optimizer.fused_back_pass off"
            )
        problems = _family_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


FLUX_VARIANTS = {"flux": ("auto", "dev", "schnell"), "flux2": ("auto", "klein", "klein-base")}


def _family_problems(config: TrainConfig) -> list[str]:
    """Settings that belong to another family, each naming the field and what to set instead."""
    family = config.model.family
    if family == "sdxl":
        if config.flux != FluxTrainingOptions():
            return ["flux: the [flux] section only applies to model.family flux or flux2; remove it for sdxl"]
        return []
    problems = []
    if config.lora.target_modules != LoraConfig().target_modules:
        problems.append(
            f"lora.target_modules: not used by {family}; set flux.lora_targets (attention, attention+mlp, all, "
            "or a list of module names) and leave lora.target_modules out"
        )
    if config.training.min_snr_gamma is not None:
        problems.append(
            f"training.min_snr_gamma: SDXL's loss weighting; for {family} use flux.loss_weighting"
        )
    if config.training.noise_offset != 0.0:
        problems.append(f"training.noise_offset: not used by flow matching ({family}); remove it")
    if config.model.prediction_type != "auto":
        problems.append(f"model.prediction_type: {family} always predicts the velocity; leave it auto")
    if config.flux.variant not in FLUX_VARIANTS[family]:
        problems.append(
            f"flux.variant: {config.flux.variant!r} is not a {family} variant; use one of "
            f"{', '.join(FLUX_VARIANTS[family])}"
        )
    if family == "flux2" and config.flux.guidance is not None:
        problems.append("flux.guidance: Flux.2 Klein has no guidance embedding; leave flux.guidance empty")
    if family == "flux2" and config.lora.train_text_encoder:
        problems.append("lora.train_text_encoder: Klein's Qwen3 text encoder is not trained; set it false")
    return problems


# ---------------------------------------------------------------- loading and errors
def load_config(path: Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a TOML config, apply `key=value` overrides, and validate; raises ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: config file not found"])
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(
            [f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"]
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{path}: not valid TOML ({error})"]) from None
    origins = {apply_override(data, override): override for override in overrides or []}
    return validate_config(data, source=str(path), overrides=origins)


def validate_config(
    data: dict[str, Any], source: str = "config", overrides: dict[tuple[str, ...], str] | None = None
) -> TrainConfig:
    """Validate; each problem is prefixed with where the value came from: the `--set` that gave it
    (`overrides`: key path -> the override as typed), else `source`."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        problems = [
            _with_origin(loc, location, message, source, overrides or {})
            for loc, location, message in located_errors(error, TrainConfig)
        ]
        raise ConfigError(problems, data=data) from None


def _with_origin(
    loc: tuple[str, ...], location: str, message: str, source: str, overrides: dict[tuple[str, ...], str]
) -> str:
    origin = next((f"--set {text}" for key, text in overrides.items() if loc[: len(key)] == key), source)
    return f"{origin}: {location}: {message}" if location else f"{origin}: {message}"


def apply_override(data: dict[str, Any], override: str) -> tuple[str, ...]:
    """`training.max_steps=500` into the nested dict; the value is read as TOML, else taken as a string."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {override!r}: expected key=value, e.g. training.max_steps=500"])
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError([f"--set {override!r}: {part} is not a section"])
    node[leaf] = value
    return tuple(part.strip() for part in [*parents, leaf])


def describe_errors(error: ValidationError, root: type[BaseModel]) -> list[str]:
    """One line per problem, naming the field; unknown keys get a did-you-mean."""
    return [
        f"{location}: {message}" if location else message
        for _, location, message in located_errors(error, root)
    ]


def located_errors(error: ValidationError, root: type[BaseModel]) -> list[tuple[tuple[str, ...], str, str]]:
    """(key path, dotted location, message) of each problem."""
    problems = []
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        location = ".".join(loc)
        if item["type"] == "extra_forbidden":
            suggestion = _did_you_mean(root, item["loc"])
            problems.append((loc, location, f"unknown key{suggestion}"))
        elif item["type"] == "missing":
            problems.append((loc, location, "required, but missing"))
        else:
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "finite_number":
                message = "must be a finite number, not nan or inf"
            given = item.get("input")
            if item["type"] in ("int_type", "float_type") and _is_number_text(given):
                message += "; write the number without quotes"
            shown = f" (got {given!r})" if not isinstance(given, dict | list) and given is not None else ""
            problems.append((loc, location, f"{message}{shown}" if location else message))
    return problems


def _is_number_text(value: Any) -> bool:
    """Whether a value is a number written as a string, as in max_steps = "100"."""
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _section_model(model: Any, name: str) -> type[BaseModel] | None:
    field = model.model_fields.get(name)
    if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
        return None
    return field.annotation


def _all_keys(root: type[BaseModel]) -> list[str]:
    """Every settable key as written in --set: "name", "training.max_steps", ..."""
    keys = []
    for name in root.model_fields:
        section = _section_model(root, name)
        keys += [f"{name}.{field}" for field in section.model_fields] if section else [name]
    return keys


def _did_you_mean(root: type[BaseModel], loc: tuple) -> str:
    """The same key in another section (max_steps at the top: training.max_steps); else the closest key in
    the same section; else the closest key of any section."""
    model: Any = root
    for part in loc[:-1]:
        model = _section_model(model, str(part))
        if model is None:
            return ""
    key, here = str(loc[-1]), ".".join(str(part) for part in loc)
    elsewhere = [full for full in _all_keys(root) if full != here]
    same_name = [full for full in elsewhere if full.rsplit(".", 1)[-1] == key]
    if same_name:
        return f"; did you mean '{same_name[0]}'?"
    local = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
    if local:
        return f"; did you mean '{local[0]}'?"
    by_leaf = {full.rsplit(".", 1)[-1]: full for full in elsewhere}
    close = difflib.get_close_matches(key, list(by_leaf), n=1, cutoff=0.75)
    if close:
        return f"; did you mean '{by_leaf[close[0]]}'?"
    return f"; known keys: {', '.join(model.model_fields)}"


def dump_config(config: TrainConfig) -> str:
    """The config as TOML (None values left out, since TOML has no null)."""
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))


def resolved_config(config: TrainConfig) -> TrainConfig:
    """The config with its defaults filled in, as saved next to a run."""
    return validate_config(config.model_dump(mode="json", exclude_none=True))
