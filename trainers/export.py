"""Writing trained LoRA adapters to ``.safetensors`` files that diffusers, ComfyUI and A1111/Forge load.

Two layouts (trainers-notes §3, environment-notes §4 "Saving and loading"):

* diffusers/PEFT: ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` plus the header entry
  ``lora_adapter_metadata`` that diffusers' own ``save_lora_weights`` writes. Without that entry diffusers
  rebuilds the LoraConfig from tensor shapes alone and silently uses lora_alpha = r.
* kohya: ``<prefix><module with "." -> "_">.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, with the
  trained lora_alpha in ``.alpha`` (diffusers' ``convert_state_dict_to_kohya`` writes the rank there instead).

Both files are written to a temporary sibling and renamed into place, so a reader sees either the old
file or the complete new one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import safe_open

from trainers.atomic import atomic_write, write_safetensors

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
KOHYA_NETWORK_MODULE = "networks.lora"

_KOHYA_PREFIXES: dict[str, str] = {
    "unet": "lora_unet_",
    "text_encoder": "lora_te1_",
    "text_encoder_2": "lora_te2_",
    "transformer": "lora_unet_",
}
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# transformers 5 flattened CLIPTextModel (no ``text_model`` attribute), so PEFT keys start at these
# roots. ComfyUI and A1111 only map the ``text_model.``-rooted spelling, and diffusers strips it again
# when the model it loads into is flattened, so both file formats put it back.
_FLAT_CLIP_ROOTS = ("embeddings.", "encoder.layers.", "final_layer_norm.")
_CLIP_ROOT = "text_model."
_LORA_A = ".lora_A.weight"
_LORA_B = ".lora_B.weight"
_SAFETENSORS_SUFFIX = ".safetensors"
# A caller-supplied value for these would corrupt how loaders read the file.
_RESERVED_METADATA_KEYS = (LORA_ADAPTER_METADATA_KEY, "format")
_FORMAT_VALUE = "pt"
# kohya's resize_lora.py writes this when ranks differ between modules.
_DYNAMIC = "Dynamic"


@dataclass
class LoraComponent:
    """One trained model part: its PEFT LoRA state dict and the LoraConfig it was trained with."""

    name: str  # "unet", "text_encoder", "text_encoder_2" (later "transformer" for Flux)
    state_dict: dict[str, torch.Tensor]  # PEFT keys, as peft.utils.get_peft_model_state_dict returns
    config: LoraConfig


@dataclass(frozen=True)
class _LoraModule:
    """One adapted layer: its module path inside the component and its two LoRA factors."""

    path: str
    down: torch.Tensor  # lora_A, [rank, in] (conv: [rank, in, kh, kw])
    up: torch.Tensor  # lora_B, [out, rank] (conv: [out, rank, 1, 1])
    alpha: float  # alpha such that alpha / rank is the scale PEFT applies


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def save_diffusers_lora(
    path: Path,
    components: list[LoraComponent],
    metadata: Mapping[str, str],
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a diffusers/PEFT-format LoRA file atomically; return its path.

    Keys are ``<component>.<PEFT key>``; the header holds ``format="pt"``, diffusers'
    ``lora_adapter_metadata`` (every component's LoraConfig, keys prefixed by component name) and
    ``metadata`` verbatim. ``dtype`` casts every tensor (None keeps each tensor's dtype).
    Raises ValueError for an inconsistent component or unusable metadata.
    """
    path, caller_metadata = checked_writer_inputs(path, components, metadata)
    tensors: dict[str, torch.Tensor] = {}
    for component in components:
        _lora_modules(component)  # validation only: PEFT keys are written as they are
        for key, tensor in component.state_dict.items():
            tensors[f"{component.name}.{_portable_key(component.name, key)}"] = _prepare(tensor, dtype)
    header = {
        "format": _FORMAT_VALUE,
        LORA_ADAPTER_METADATA_KEY: _adapter_metadata_json(components),
        **caller_metadata,
    }
    return _atomic_save(tensors, path, header)


def save_kohya_lora(
    path: Path,
    components: list[LoraComponent],
    metadata: Mapping[str, str],
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a kohya-format LoRA file (diffusers module names) atomically; return its path.

    Per module: ``<name>.lora_down.weight``, ``<name>.lora_up.weight`` (cast to ``dtype``; None keeps
    each tensor's dtype) and ``<name>.alpha``, a float32 scalar holding lora_alpha. ``metadata`` is
    written verbatim; ``format``, ``ss_network_module``, ``ss_network_dim`` and ``ss_network_alpha``
    are added where the caller did not give them. Raises ValueError for an inconsistent component,
    NotImplementedError for a Flux ``transformer`` (kohya Flux files use BFL module names).
    """
    path, caller_metadata = checked_writer_inputs(path, components, metadata)
    tensors: dict[str, torch.Tensor] = {}
    all_modules: list[_LoraModule] = []
    for component in components:
        modules = _kohya_modules(component)
        all_modules += modules
        prefix = kohya_prefix(component.name)
        for module in modules:
            _add_kohya_module(tensors, prefix + module.path.replace(".", "_"), module, dtype)
    header = {
        "format": _FORMAT_VALUE,
        "ss_network_module": KOHYA_NETWORK_MODULE,
        **_kohya_network_metadata(all_modules),
        **caller_metadata,
    }
    return _atomic_save(tensors, path, header)


def kohya_prefix(component_name: str) -> str:
    """Return the kohya key prefix for a component ("unet" -> "lora_unet_", "text_encoder" -> "lora_te1_")."""
    try:
        return _KOHYA_PREFIXES[component_name]
    except KeyError:
        raise ValueError(
            f"no kohya prefix for component {component_name!r}; known: {sorted(_KOHYA_PREFIXES)}"
        ) from None


def read_lora_metadata(path: Path) -> dict[str, str]:
    """Return the safetensors header metadata of ``path`` ({} if it has none); tensors are not read."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


# --------------------------------------------------------------------------------------------------
# Validation and module extraction
# --------------------------------------------------------------------------------------------------


def checked_writer_inputs(
    path: Path, components: list[LoraComponent], metadata: Mapping[str, str]
) -> tuple[Path, dict[str, str]]:
    """What every LoRA writer checks first: the path (a .safetensors file), the components (at least one,
    no name twice) and the metadata (strings, no reserved key); the path and the metadata as a dict."""
    path = _check_path(path)
    _check_components(components)
    return path, _check_metadata(metadata)


def _check_path(path: Path) -> Path:
    """Return ``path`` as a Path; raise ValueError unless it names a ``.safetensors`` file."""
    path = Path(path)
    # diffusers only tries safetensors for a weight_name ending in .safetensors; otherwise it unpickles.
    if path.suffix != _SAFETENSORS_SUFFIX:
        raise ValueError(f"LoRA file name must end in {_SAFETENSORS_SUFFIX}: {path}")
    if path.is_dir():
        raise ValueError(f"LoRA path is a folder, expected a file: {path}")
    return path


def _check_components(components: list[LoraComponent]) -> None:
    """Raise ValueError if there is no component or a component name repeats."""
    if not components:
        raise ValueError("no LoRA component to export")
    names = [component.name for component in components]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"LoRA component listed more than once: {', '.join(duplicates)}")


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Return ``metadata`` as a dict; raise ValueError for non-string entries or reserved keys."""
    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise ValueError(f"metadata keys and values must be strings; offending keys: {bad}")
    if metadata.get("format", _FORMAT_VALUE) != _FORMAT_VALUE:
        raise ValueError(f"metadata 'format' is reserved and must be {_FORMAT_VALUE!r}")
    if LORA_ADAPTER_METADATA_KEY in metadata:
        # In a kohya file diffusers would refuse it next to .alpha tensors; in a diffusers file it
        # would replace the adapter configs this module writes.
        raise ValueError(
            f"metadata key {LORA_ADAPTER_METADATA_KEY!r} is reserved; it is written from the configs"
        )
    return dict(metadata)


def _lora_modules(component: LoraComponent) -> list[_LoraModule]:
    """Return the component's adapted modules, sorted by path, after checking pairs and ranks.

    Raises ValueError naming the component if a lora_A lacks its lora_B (or the reverse), or if a
    module's rank disagrees between its factors or with the LoraConfig (``r``/``rank_pattern``).
    """
    downs = _factors(component.state_dict, _LORA_A)
    ups = _factors(component.state_dict, _LORA_B)
    unpaired = sorted(downs.keys() ^ ups.keys())
    if unpaired:
        raise ValueError(
            f"LoRA component {component.name!r}: lora_A without lora_B (or the reverse) for {unpaired}"
        )
    if not downs:
        raise ValueError(f"LoRA component {component.name!r} holds no lora_A/lora_B weights")
    return [_make_module(component, path, downs[path], ups[path]) for path in sorted(downs)]


def _factors(state_dict: Mapping[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
    """Return {module path: tensor} for the keys ending in ``suffix``."""
    return {key[: -len(suffix)]: tensor for key, tensor in state_dict.items() if key.endswith(suffix)}


def _make_module(component: LoraComponent, path: str, down: torch.Tensor, up: torch.Tensor) -> _LoraModule:
    """Return one module with its effective alpha; raise ValueError if its rank is inconsistent."""
    config = component.config
    rank = _pattern_value(config.rank_pattern, path, config.r)
    if down.ndim < 2 or up.ndim < 2 or down.shape[0] != rank or up.shape[1] != rank:
        raise ValueError(
            f"LoRA component {component.name!r}, module {path!r}: lora_A {tuple(down.shape)} and "
            f"lora_B {tuple(up.shape)} do not match the config's rank {rank}"
        )
    alpha = float(_pattern_value(config.alpha_pattern, path, config.lora_alpha))
    # kohya always scales by alpha / rank; rsLoRA's alpha / sqrt(rank) is the same as alpha * sqrt(rank) / rank.
    if config.use_rslora:
        alpha *= math.sqrt(rank)
    return _LoraModule(path=path, down=down, up=up, alpha=alpha)


def _pattern_value(pattern: Mapping[str, float] | None, module_path: str, default: float) -> float:
    """Return the value of the first ``pattern`` key matching ``module_path``, else ``default``.

    Same rule as PEFT's ``get_pattern_key`` (a regex that must match a dotted suffix of the path),
    restated here because that helper is not part of PEFT's public API.
    """
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def _kohya_modules(component: LoraComponent) -> list[_LoraModule]:
    """Return the component's modules with kohya-portable paths; raise if kohya cannot express them."""
    if component.name == "transformer":
        raise NotImplementedError(
            "kohya export for Flux needs BFL module names (lora_unet_double_blocks_...), see trainers-notes §3.2"
        )
    kohya_prefix(component.name)  # unknown component names fail before any work
    config = component.config
    if config.use_dora or config.lora_bias:
        raise ValueError(
            f"LoRA component {component.name!r}: DoRA / LoRA bias cannot be written in kohya format"
        )
    modules = _lora_modules(component)
    known = {module.path + suffix for module in modules for suffix in (_LORA_A, _LORA_B)}
    extra = sorted(set(component.state_dict) - known)
    if extra:
        raise ValueError(f"LoRA component {component.name!r}: keys kohya format cannot hold: {extra}")
    return [_LoraModule(_portable_key(component.name, m.path), m.down, m.up, m.alpha) for m in modules]


def _portable_key(component_name: str, key: str) -> str:
    """Return ``key`` rooted at ``text_model.`` for a flattened CLIP text encoder, else unchanged."""
    if component_name in _TEXT_ENCODERS and key.startswith(_FLAT_CLIP_ROOTS):
        return _CLIP_ROOT + key
    return key


# --------------------------------------------------------------------------------------------------
# Tensors and header
# --------------------------------------------------------------------------------------------------


def _prepare(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Return a detached, contiguous CPU copy-or-view of ``tensor`` in ``dtype`` (None keeps it)."""
    return tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype).contiguous()


def _add_kohya_module(
    tensors: dict[str, torch.Tensor], name: str, module: _LoraModule, dtype: torch.dtype | None
) -> None:
    """Add ``name``'s down/up/alpha tensors; raise ValueError if two module paths collapse to ``name``."""
    if f"{name}.alpha" in tensors:
        raise ValueError(f"two modules map to the same kohya name {name!r}")
    tensors[f"{name}.lora_down.weight"] = _prepare(module.down, dtype)
    tensors[f"{name}.lora_up.weight"] = _prepare(module.up, dtype)
    # float32 whatever the weight dtype: bf16 cannot hold e.g. alpha 0.3 or 257 exactly, and every
    # reader takes the value with .item().
    tensors[f"{name}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)


def _adapter_metadata_json(components: Iterable[LoraComponent]) -> str:
    """Return the ``lora_adapter_metadata`` JSON string, laid out as diffusers 0.42.1 writes it.

    diffusers (``LoraBaseMixin._save_lora_weights`` / ``write_lora_layers``) stores
    ``LoraConfig.to_dict()`` per component with keys prefixed ``"<component>."``, sets turned into
    lists, dumped with ``indent=2, sort_keys=True``; ``load_lora_weights`` feeds each component's slice
    back into ``LoraConfig(**...)``.
    """
    packed: dict[str, object] = {}
    for component in components:
        for key, value in component.config.to_dict().items():
            # Sorted so the same config gives byte-identical files (diffusers' list(set) order varies).
            packed[f"{component.name}.{key}"] = sorted(value) if isinstance(value, set) else value
    return json.dumps(packed, indent=2, sort_keys=True)


def _kohya_network_metadata(modules: list[_LoraModule]) -> dict[str, str]:
    """Return ``ss_network_dim`` / ``ss_network_alpha``; "Dynamic" where modules disagree (as kohya)."""
    ranks = {module.down.shape[0] for module in modules}
    alphas = {module.alpha for module in modules}
    return {
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else _DYNAMIC,
        # kohya stores network_alpha as str(float), e.g. "8.0".
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else _DYNAMIC,
    }


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write ``tensors`` with ``metadata`` atomically to ``path``; return ``path``."""
    return atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, metadata))
