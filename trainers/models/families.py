"""What each family's adapter knows before anything loads, importing no model library: whether a single
file is this family's model (from its header's tensor names), which config fields name LoRA targets of
which component, the demo models' component configs, and the meta-device build of a component (diffusers
or transformers imported inside, only when a layer table is not cached).

`python -m trainers check` reads these through `family_for`; the adapters (sdxl.py, flux.py, flux2.py)
inherit them, so there is one definition of each.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from trainers.config import DEMO_SCHEME, TrainConfig
from trainers.models.base import guess_model_kind

if TYPE_CHECKING:
    import torch

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# Keys every SDXL single-file checkpoint has: its UNet, and the second (OpenCLIP bigG) text encoder.
SDXL_KEY_PREFIXES = ("model.diffusion_model.", "conditioner.embedders.1.")


class SDXLFamily:
    family = "sdxl"
    model_file_hint = "an SDXL .safetensors checkpoint"
    components = ("unet", "text_encoder", "text_encoder_2")

    # ------------------------------------------------------------------ checks before loading
    @classmethod
    def check_model_file(cls, path: Path, keys: list[str]) -> str | None:
        if all(any(key.startswith(prefix) for key in keys) for prefix in SDXL_KEY_PREFIXES):
            return None
        return (
            f"model.path: {path} is not an SDXL checkpoint ({guess_model_kind(keys)}: no "
            f"{' / '.join(p + '*' for p in SDXL_KEY_PREFIXES)} tensors); give an SDXL .safetensors checkpoint "
            "or a diffusers folder"
        )

    @classmethod
    def lora_target_lists(cls, config: TrainConfig) -> list[tuple[str, str, list[str]]]:
        lora = config.lora
        targets = [("lora.target_modules", "unet", lora.target_modules)]
        if lora.train_text_encoder:
            field = "lora.text_encoder_target_modules"
            targets += [(field, name, lora.text_encoder_target_modules) for name in TEXT_ENCODERS]
        return targets

    @classmethod
    def component_config(cls, model_path: str, component: str) -> dict | None:
        if not model_path.startswith(DEMO_SCHEME):
            return None
        from trainers.tiny_models import CLIP_CONFIG, UNET_CONFIG

        return dict(UNET_CONFIG) if component == "unet" else dict(CLIP_CONFIG)

    @classmethod
    def meta_component(cls, component: str, config: dict) -> torch.nn.Module:
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        model_class = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
        return model_class(CLIPTextConfig.from_dict(config))


class FlowMatchingFamily:
    family: str
    model_file_hint: str
    components: tuple[str, ...] = ("transformer",)
    text_encoders: tuple[str, ...] = ()
    transformer_class_name: str  # the diffusers class, imported only when a component is built
    # tensor-name prefixes a single transformer file of this family has (BFL or diffusers naming), and
    # prefixes that mark the other Flux family
    file_key_prefixes: tuple[str, ...] = ()
    foreign_key_prefixes: tuple[str, ...] = ()

    # ------------------------------------------------------------------ checks before loading
    @classmethod
    def check_model_file(cls, path: Path, keys: list[str]) -> str | None:
        def has(prefix: str) -> bool:
            return any(key.startswith(prefix) or f".{prefix}" in key for key in keys)

        if any(has(prefix) for prefix in cls.file_key_prefixes) and not any(
            has(prefix) for prefix in cls.foreign_key_prefixes
        ):
            return None
        return (
            f"model.path: {path} is not a {cls.family} transformer ({guess_model_kind(keys)}: no "
            f"{' / '.join(p + '*' for p in cls.file_key_prefixes)} tensors); give the family's transformer "
            ".safetensors with flux.components_path, or a diffusers folder (or set model.family to the "
            "model's family)"
        )

    @classmethod
    def lora_target_lists(cls, config: TrainConfig) -> list[tuple[str, str, list[str]]]:
        targets = config.flux.lora_targets
        # a named set is this module's own regex, so only a raw module list can name a missing layer
        return [("flux.lora_targets", "transformer", targets)] if isinstance(targets, list) else []

    @classmethod
    def component_config(cls, model_path: str, component: str) -> dict | None:
        return None  # the tiny demo models are built as folders; their configs are read from there

    @classmethod
    def meta_component(cls, component: str, config: dict) -> torch.nn.Module:
        return getattr(importlib.import_module("diffusers"), cls.transformer_class_name).from_config(config)


class FluxFamily(FlowMatchingFamily):
    family = "flux"
    model_file_hint = "a Flux.1 transformer .safetensors (with flux.components_path)"
    components = ("transformer", "text_encoder")  # the transformer, then CLIP-L when it trains
    text_encoders = ("text_encoder", "text_encoder_2")
    transformer_class_name = "FluxTransformer2DModel"
    file_key_prefixes = ("double_blocks.", "single_transformer_blocks.")  # BFL / diffusers names
    foreign_key_prefixes = ("double_stream_modulation_img.",)  # Klein's shared modulation

    @classmethod
    def lora_target_lists(cls, config: TrainConfig) -> list[tuple[str, str, list[str]]]:
        targets = super().lora_target_lists(config)
        if config.lora.train_text_encoder:  # CLIP-L only, as kohya and the diffusers example train it
            targets.append(
                ("lora.text_encoder_target_modules", "text_encoder", config.lora.text_encoder_target_modules)
            )
        return targets

    @classmethod
    def component_config(cls, model_path: str, component: str) -> dict | None:
        if model_path != DEMO_SCHEME + "tiny-flux":
            return None
        from trainers.tiny_flux import CLIP_CONFIG, FLUX_TRANSFORMER_CONFIG

        return dict(FLUX_TRANSFORMER_CONFIG) if component == "transformer" else dict(CLIP_CONFIG)

    @classmethod
    def meta_component(cls, component: str, config: dict) -> torch.nn.Module:
        if component == "transformer":
            return super().meta_component(component, config)
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig.from_dict(config))


class Flux2Family(FlowMatchingFamily):
    family = "flux2"
    model_file_hint = "a Flux.2 Klein transformer .safetensors (with flux.components_path)"
    components = ("transformer",)
    text_encoders = ("text_encoder",)
    transformer_class_name = "Flux2Transformer2DModel"
    file_key_prefixes = ("double_stream_modulation_img.",)  # the modulation all Flux.2 blocks share

    @classmethod
    def component_config(cls, model_path: str, component: str) -> dict | None:
        if model_path != DEMO_SCHEME + "tiny-klein":
            return None
        from trainers.tiny_flux import KLEIN_TRANSFORMER_CONFIG

        return dict(KLEIN_TRANSFORMER_CONFIG)


FAMILIES: dict[str, type] = {"sdxl": SDXLFamily, "flux": FluxFamily, "flux2": Flux2Family}


def family_for(family: str) -> type[SDXLFamily] | type[FlowMatchingFamily]:
    """The pre-load knowledge of a model family named in the config (no model library imported)."""
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"model.family: unknown family {family!r}; supported: sdxl, flux, flux2") from None
