"""What each family's adapter knows before anything loads, importing no model library (nor torch): whether
a single file is this family's model (from its header's tensor names), which config fields name LoRA
targets of which component, the demo models' component configs, the architecture configs the memory
estimate measures, and the meta-device build of a component (diffusers or transformers imported inside,
only when a layer table is not cached).

`python -m trainers check` reads these through `family_for`; the adapters (sdxl.py, flux.py, flux2.py)
and the memory models (sdxl_memory.py, flux_memory.py) use them, so there is one definition of each.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from trainers.config import DEMO_SCHEME, TrainConfig

if TYPE_CHECKING:
    import torch

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# Keys every SDXL single-file checkpoint has: its UNet, and the second (OpenCLIP bigG) text encoder.
SDXL_KEY_PREFIXES = ("model.diffusion_model.", "conditioner.embedders.1.")
# The published configs of the model repos (SDXL base 1.0 and the black-forest-labs repos), for models
# whose own configs are not on this machine.
CONFIGS = Path(__file__).parent / "configs"
KNOWN_SDXL_REPOS = {
    "stabilityai/stable-diffusion-xl-base-1.0",
    "stabilityai/sdxl-turbo",
    "RunDiffusion/Juggernaut-XL-v9",
    "cagliostrolab/animagine-xl-3.1",
}

Architecture = tuple[dict[str, dict], str]  # the components' configs, and where they came from


def guess_model_kind(keys: list[str]) -> str:
    """What a safetensors file with tensor names `keys` looks like, for "not a <family> model" messages."""

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) or f".{prefix}" in key for key in keys)

    if not keys:
        return "it holds no tensors"
    if any(key.startswith(("lora_", "lora_unet_")) or ".lora_" in key or ".lora." in key for key in keys):
        return "it looks like a LoRA, not a base model"
    if has("double_stream_modulation_img."):
        return "it looks like a Flux.2 (Klein) model"
    if has("double_blocks.") or has("single_transformer_blocks."):
        return "it looks like a Flux model"
    if has("cond_stage_model.") or keys[0].startswith("model.diffusion_model."):
        return "it looks like a Stable Diffusion 1.x/2.x checkpoint"
    if any(key.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for key in keys):
        return "it looks like a diffusers UNet alone; give the whole pipeline folder"
    return f"{len(keys)} tensors of another kind"


def _read_configs(parts: Iterable[str], path_of: Callable[[str], Path]) -> dict[str, dict]:
    return {part: json.loads(path_of(part).read_text(encoding="utf-8")) for part in parts}


def _hub_cached_configs(repo: str, parts: tuple[str, ...]) -> dict[str, dict] | None:
    """The components' configs of a Hub repo in the local Hugging Face cache, or None if one is missing."""
    from huggingface_hub import try_to_load_from_cache

    paths = {part: try_to_load_from_cache(repo, f"{part}/config.json") for part in parts}
    if not all(isinstance(path, str) for path in paths.values()):
        return None
    return _read_configs(parts, lambda part: Path(paths[part]))


class SDXLFamily:
    family = "sdxl"
    model_file_hint = "an SDXL .safetensors checkpoint"
    components = ("unet", "text_encoder", "text_encoder_2")
    # what the memory estimate builds (module, class), and the component configs it reads
    memory_model = ("trainers.models.sdxl_memory", "SDXLMemoryModel")
    architecture_parts = ("unet", "text_encoder", "text_encoder_2", "vae")

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
        from trainers.tiny_models import CLIP_CONFIG, DEMO_UNET_CONFIG

        return dict(DEMO_UNET_CONFIG) if component == "unet" else dict(CLIP_CONFIG)

    @classmethod
    def meta_component(cls, component: str, config: dict) -> torch.nn.Module:
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        model_class = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
        return model_class(CLIPTextConfig.from_dict(config))

    # ------------------------------------------------------------------ the memory estimate's architecture
    @classmethod
    def estimate_architecture(cls, config: TrainConfig) -> Architecture:
        """The four component configs for `model.path`, and where they came from; reads no weights."""
        model_path = config.model.path
        if model_path.startswith(DEMO_SCHEME):
            from trainers.tiny_models import CLIP_CONFIG, DEMO_UNET_CONFIG, VAE_CONFIG

            configs = {"unet": DEMO_UNET_CONFIG, "vae": VAE_CONFIG, "text_encoder": CLIP_CONFIG}
            return {**configs, "text_encoder_2": CLIP_CONFIG}, f"the demo model's own configs ({model_path})"
        parts = cls.architecture_parts
        folder = Path(model_path).expanduser()
        if folder.is_dir() and (folder / "model_index.json").is_file():
            return _read_configs(parts, lambda part: folder / part / "config.json"), f"{folder}'s own configs"
        if not folder.exists() and model_path.count("/") == 1:
            cached = _hub_cached_configs(model_path, parts)
            if cached is not None:
                return cached, f"{model_path}'s configs from the local Hugging Face cache"
            if model_path in KNOWN_SDXL_REPOS:
                return (
                    cls._bundled(),
                    "the bundled SDXL base 1.0 configs (the model is not in the local cache)",
                )
        what = "single-file checkpoint" if folder.is_file() else "model"
        return (
            cls._bundled(),
            f"the bundled SDXL base 1.0 configs (assumed for this {what}: SDXL's architecture)",
        )

    @classmethod
    def _bundled(cls) -> dict[str, dict]:
        return _read_configs(cls.architecture_parts, lambda part: CONFIGS / "sdxl" / f"{part}.json")


class FlowMatchingFamily:
    family: str
    model_file_hint: str
    components: tuple[str, ...] = ("transformer",)
    text_encoders: tuple[str, ...] = ()
    transformer_class_name: str  # the diffusers class, imported only when a component is built
    memory_model: tuple[str, str]  # what the memory estimate builds: (module, class)
    architecture_parts: tuple[str, ...]  # config file stems: transformer, vae, text encoders
    demo_model: str  # the demo model's name (model.path demo://<name>)
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

    # ------------------------------------------------------------------ the memory estimate's architecture
    @classmethod
    def estimate_architecture(cls, config: TrainConfig) -> Architecture:
        """The component configs for `model.path` (or `flux.components_path`), and where they came from;
        reads no weights."""
        path, options = config.model.path, config.flux
        if path == DEMO_SCHEME + cls.demo_model:
            return cls._demo_configs(), f"the demo model's own configs ({path})"
        # a single transformer file takes the rest (and its architecture) from components_path
        source = options.components_path or path
        folder = Path(source).expanduser()
        parts = cls.architecture_parts
        if folder.is_dir() and (folder / "model_index.json").is_file():
            return _read_configs(parts, lambda part: folder / part / "config.json"), f"{folder}'s own configs"
        if not folder.exists() and source.count("/") == 1:
            cached = _hub_cached_configs(source, parts)
            if cached is not None:
                return cached, f"{source}'s configs from the local Hugging Face cache"
        name = cls._bundled_name(source, options)
        bundled = _read_configs(parts, lambda part: CONFIGS / name / f"{part}.json")
        return bundled, f"the bundled {name} configs (assumed for {source})"

    @classmethod
    def _bundled_name(cls, path: str, options) -> str:
        raise NotImplementedError

    @classmethod
    def _demo_configs(cls) -> dict[str, dict]:
        raise NotImplementedError


class FluxFamily(FlowMatchingFamily):
    family = "flux"
    model_file_hint = "a Flux.1 transformer .safetensors (with flux.components_path)"
    components = ("transformer", "text_encoder")  # the transformer, then CLIP-L when it trains
    text_encoders = ("text_encoder", "text_encoder_2")
    transformer_class_name = "FluxTransformer2DModel"
    memory_model = ("trainers.models.flux_memory", "FluxMemoryModel")
    architecture_parts = ("transformer", "vae", "text_encoder", "text_encoder_2")
    demo_model = "tiny-flux"
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
        from trainers.tiny_flux import CLIP_CONFIG, DEMO_FLUX_TRANSFORMER_CONFIG

        return dict(DEMO_FLUX_TRANSFORMER_CONFIG) if component == "transformer" else dict(CLIP_CONFIG)

    @classmethod
    def meta_component(cls, component: str, config: dict) -> torch.nn.Module:
        if component == "transformer":
            return super().meta_component(component, config)
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig.from_dict(config))

    @classmethod
    def _bundled_name(cls, path: str, options) -> str:
        asked = options.variant
        schnell = asked == "schnell" or (asked == "auto" and "schnell" in path.lower())
        return "flux1-schnell" if schnell else "flux1-dev"

    @classmethod
    def _demo_configs(cls) -> dict[str, dict]:
        from trainers.tiny_flux import DEMO_FLUX_TRANSFORMER_CONFIG, DEMO_FLUX_VAE_CONFIG, T5_CONFIG
        from trainers.tiny_models import CLIP_CONFIG

        return {
            "transformer": {**DEMO_FLUX_TRANSFORMER_CONFIG, "guidance_embeds": True},
            "vae": DEMO_FLUX_VAE_CONFIG,
            "text_encoder": CLIP_CONFIG,
            "text_encoder_2": T5_CONFIG,
        }


class Flux2Family(FlowMatchingFamily):
    family = "flux2"
    model_file_hint = "a Flux.2 Klein transformer .safetensors (with flux.components_path)"
    components = ("transformer",)
    text_encoders = ("text_encoder",)
    transformer_class_name = "Flux2Transformer2DModel"
    file_key_prefixes = ("double_stream_modulation_img.",)  # the modulation all Flux.2 blocks share
    memory_model = ("trainers.models.flux_memory", "Flux2MemoryModel")
    architecture_parts = ("transformer", "vae", "text_encoder")
    demo_model = "tiny-klein"

    @classmethod
    def component_config(cls, model_path: str, component: str) -> dict | None:
        if model_path != DEMO_SCHEME + "tiny-klein":
            return None
        from trainers.tiny_flux import DEMO_KLEIN_TRANSFORMER_CONFIG

        return dict(DEMO_KLEIN_TRANSFORMER_CONFIG)

    @classmethod
    def _bundled_name(cls, path: str, options) -> str:
        return "flux2-klein-9b" if "9b" in path.lower() else "flux2-klein-4b"

    @classmethod
    def _demo_configs(cls) -> dict[str, dict]:
        from trainers.tiny_flux import DEMO_KLEIN_TRANSFORMER_CONFIG, DEMO_KLEIN_VAE_CONFIG, QWEN_CONFIG

        return {
            "transformer": DEMO_KLEIN_TRANSFORMER_CONFIG,
            "vae": DEMO_KLEIN_VAE_CONFIG,
            "text_encoder": {**QWEN_CONFIG, "vocab_size": tiny_qwen_vocab_size()},
        }


def tiny_qwen_vocab_size() -> int:
    """The vocabulary of tiny_flux.make_qwen_tokenizer (as make_tiny_klein_pipeline sizes the embedding),
    counted without building it (transformers takes seconds to import); tests/test_cli_startup.py holds
    it to len(make_qwen_tokenizer())."""
    from trainers.tiny_flux import qwen_vocab_and_merges

    return len(qwen_vocab_and_merges()[0])


FAMILIES: dict[str, type] = {"sdxl": SDXLFamily, "flux": FluxFamily, "flux2": Flux2Family}


def family_for(family: str) -> type[SDXLFamily] | type[FlowMatchingFamily]:
    """The pre-load knowledge of a model family named in the config (no model library imported)."""
    try:
        return FAMILIES[family]
    except KeyError:
        raise ValueError(f"model.family: unknown family {family!r}; supported: sdxl, flux, flux2") from None
