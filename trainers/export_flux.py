"""Flux LoRA files in the layouts the ecosystem loads, from PEFT state dicts over diffusers module names.

* diffusers: `save_diffusers_lora` as for SDXL (`transformer.` / `text_encoder.` prefixes and
  `lora_adapter_metadata`); without the prefix diffusers silently ignores the keys.
* kohya / ComfyUI Flux.1 (`save_flux1_kohya_lora`): BFL module names with the `lora_unet_` prefix,
  `.lora_down/.lora_up/.alpha`, `lora_te1_` for CLIP-L. BFL fuses q/k/v (and, in single blocks, the MLP
  input) into one Linear, so separately trained LoRAs are folded *exactly* into one of rank sum(r_i):
  down = the downs stacked, up = block diagonal, each part's alpha/r folded in so that
  (alpha / R) up @ down equals the sum of the parts' deltas.
* Flux.2 Klein BFL form (`save_klein_bfl_lora`): `diffusion_model.<BFL name>.lora_A/.lora_B.weight` without
  alpha (loaders then use scale 1, so each module's alpha/r is folded into lora_B), as ai-toolkit writes it
  and ComfyUI and diffusers load it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from trainers.export import (
    _FORMAT_VALUE,
    LoraComponent,
    _add_kohya_module,
    _atomic_save,
    _kohya_modules,
    _kohya_network_metadata,
    _lora_modules,
    _LoraModule,
    _prepare,
    checked_writer_inputs,
    kohya_prefix,
    save_diffusers_lora,
    save_kohya_lora,
)

FLUX1_NETWORK_MODULE = "networks.lora_flux"  # what sd-scripts' Flux LoRAs record
FLUX1_MLP_RATIO = 4  # FluxSingleTransformerBlock: proj_mlp has 4 x hidden outputs
KLEIN_PREFIX = "diffusion_model."


@dataclass(frozen=True)
class FusedTarget:
    """One BFL Linear and the diffusers Linears whose outputs it stacks (rows in this order)."""

    name: str  # BFL module path, e.g. "double_blocks.0.img_attn.qkv"
    parts: tuple[str, ...]  # diffusers module paths, e.g. ("transformer_blocks.0.attn.to_q", ...)
    mlp_last: bool = False  # the last part has FLUX1_MLP_RATIO x the rows of the others (Flux.1 linear1)


# diffusers -> BFL, one-to-one renames inside a block (regex over the path after the block index)
_FLUX1_DOUBLE_RENAMES = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
_FLUX1_SINGLE_RENAMES = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_KLEIN_DOUBLE_RENAMES = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_KLEIN_SINGLE_RENAMES = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_KLEIN_GLOBAL_RENAMES = {
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
}
_QKV = ("to_q", "to_k", "to_v")
_ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")
_BLOCK = re.compile(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)")


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


LoraWriter = Callable[..., Path]


def lora_writer(family: str, fmt: str) -> LoraWriter:
    """The function that writes `family`'s LoRA in `fmt` ("kohya": the file ComfyUI / A1111 / Forge users load
    (for Klein the BFL-named diffusion_model. form), "diffusers": for diffusers' load_lora_weights)."""
    writers: dict[str, dict[str, LoraWriter]] = {
        "sdxl": {"kohya": save_kohya_lora, "diffusers": save_diffusers_lora},
        "flux": {"kohya": save_flux1_kohya_lora, "diffusers": save_diffusers_lora},
        "flux2": {"kohya": save_klein_bfl_lora, "diffusers": save_diffusers_lora},
    }
    if family not in writers:
        raise ValueError(f"model.family: no LoRA export for {family!r}; known: {', '.join(writers)}")
    if fmt not in writers[family]:
        raise ValueError(f"saving.formats: unknown LoRA format {fmt!r}; use kohya or diffusers")
    return writers[family][fmt]


def save_flux1_kohya_lora(
    path: Path,
    components: list[LoraComponent],
    metadata: Mapping[str, str],
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a kohya/ComfyUI Flux.1 LoRA (BFL names, fused qkv / linear1) atomically; return its path."""
    path, caller_metadata = checked_writer_inputs(path, components, metadata)
    tensors: dict[str, torch.Tensor] = {}
    written: list[_LoraModule] = []
    for component in components:
        if component.name == "transformer":
            modules = flux1_bfl_modules(_lora_modules(component))
            prefix = "lora_unet_"
        elif component.name == "text_encoder":
            modules = _kohya_modules(component)  # CLIP-L under its text_model. names, as for SDXL
            prefix = kohya_prefix("text_encoder")  # lora_te1_
        else:
            raise ValueError(f"Flux.1 kohya export: unknown component {component.name!r}")
        for module in modules:
            _add_kohya_module(tensors, prefix + module.path.replace(".", "_"), module, dtype)
        written += modules
    header = {
        "format": _FORMAT_VALUE,
        "ss_network_module": FLUX1_NETWORK_MODULE,
        **_kohya_network_metadata(written),
        **caller_metadata,
    }
    return _atomic_save(tensors, path, header)


def save_klein_bfl_lora(
    path: Path,
    components: list[LoraComponent],
    metadata: Mapping[str, str],
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a Flux.2 Klein LoRA as `diffusion_model.<BFL name>.lora_A/lora_B.weight` (scale folded in)."""
    path, caller_metadata = checked_writer_inputs(path, components, metadata)
    if [c.name for c in components] != ["transformer"]:
        raise ValueError("Flux.2 export: only a transformer LoRA can be written (no text-encoder LoRA)")
    tensors: dict[str, torch.Tensor] = {}
    for module in klein_bfl_modules(_lora_modules(components[0])):
        scale = module.alpha / module.down.shape[0]
        tensors[f"{KLEIN_PREFIX}{module.path}.lora_A.weight"] = _prepare(module.down, dtype)
        up = _prepare(
            module.up.float() * scale, dtype or module.up.dtype
        )  # folded in fp32, kept in its dtype
        tensors[f"{KLEIN_PREFIX}{module.path}.lora_B.weight"] = up
    return _atomic_save(tensors, path, {"format": _FORMAT_VALUE, **caller_metadata})


# --------------------------------------------------------------------------------------------------
# Name maps and fusion
# --------------------------------------------------------------------------------------------------


def flux1_bfl_modules(modules: list[_LoraModule]) -> list[_LoraModule]:
    """The transformer's LoRA modules under Flux.1 BFL names, q/k/v (+ proj_mlp) fused."""
    by_path = {m.path: m for m in modules}
    fused: list[FusedTarget] = []
    renamed: list[_LoraModule] = []
    for module in modules:
        block, index, rest = _split_block(module.path)
        if block == "transformer_blocks" and rest in {f"attn.{p}" for p in _QKV}:
            fused.append(_double_qkv(index, "img_attn", _QKV))
        elif block == "transformer_blocks" and rest in {f"attn.{p}" for p in _ADDED_QKV}:
            fused.append(_double_qkv(index, "txt_attn", _ADDED_QKV))
        elif block == "single_transformer_blocks" and rest in {*(f"attn.{p}" for p in _QKV), "proj_mlp"}:
            prefix = f"single_transformer_blocks.{index}."
            parts = (*(f"{prefix}attn.{name}" for name in _QKV), f"{prefix}proj_mlp")
            fused.append(FusedTarget(f"single_blocks.{index}.linear1", parts, mlp_last=True))
        elif block == "transformer_blocks" and rest in _FLUX1_DOUBLE_RENAMES:
            renamed.append(_renamed(module, f"double_blocks.{index}.{_FLUX1_DOUBLE_RENAMES[rest]}"))
        elif block == "single_transformer_blocks" and rest in _FLUX1_SINGLE_RENAMES:
            renamed.append(_renamed(module, f"single_blocks.{index}.{_FLUX1_SINGLE_RENAMES[rest]}"))
        else:
            raise ValueError(f"Flux.1 kohya export: no BFL name for the LoRA on {module.path!r}")
    return renamed + [fuse(target, by_path) for target in dict.fromkeys(fused)]


def klein_bfl_modules(modules: list[_LoraModule]) -> list[_LoraModule]:
    """The transformer's LoRA modules under Flux.2 BFL names, q/k/v fused in the double blocks."""
    by_path = {m.path: m for m in modules}
    fused: list[FusedTarget] = []
    renamed: list[_LoraModule] = []
    for module in modules:
        if module.path in _KLEIN_GLOBAL_RENAMES:
            renamed.append(_renamed(module, _KLEIN_GLOBAL_RENAMES[module.path]))
            continue
        block, index, rest = _split_block(module.path)
        if block == "transformer_blocks" and rest in {f"attn.{p}" for p in _QKV}:
            fused.append(_double_qkv(index, "img_attn", _QKV))
        elif block == "transformer_blocks" and rest in {f"attn.{p}" for p in _ADDED_QKV}:
            fused.append(_double_qkv(index, "txt_attn", _ADDED_QKV))
        elif block == "transformer_blocks" and rest in _KLEIN_DOUBLE_RENAMES:
            renamed.append(_renamed(module, f"double_blocks.{index}.{_KLEIN_DOUBLE_RENAMES[rest]}"))
        elif block == "single_transformer_blocks" and rest in _KLEIN_SINGLE_RENAMES:
            renamed.append(_renamed(module, f"single_blocks.{index}.{_KLEIN_SINGLE_RENAMES[rest]}"))
        else:
            raise ValueError(f"Flux.2 BFL export: no BFL name for the LoRA on {module.path!r}")
    return renamed + [fuse(target, by_path) for target in dict.fromkeys(fused)]


def fuse(target: FusedTarget, by_path: Mapping[str, _LoraModule]) -> _LoraModule:
    """One LoRA on the fused Linear whose delta is exactly the stacked deltas of the parts.

    delta_i = (alpha_i / r_i) up_i @ down_i. With down = [down_1; ...; down_n] (R = sum r_i rows) and up
    block diagonal (part i's rows x part i's columns = c_i up_i, zeros elsewhere), (alpha / R) up @ down
    stacks (alpha / R) c_i up_i down_i, so c_i = (alpha_i / r_i) (R / alpha). When every part has the same
    scale s, alpha = s R and c_i = 1 (the trained factors are written unchanged); otherwise alpha = R.
    A part without a LoRA contributes zero rows (its output size is that of the others, or
    FLUX1_MLP_RATIO times it for linear1's MLP part).
    """
    present = [by_path.get(part) for part in target.parts]
    trained = [m for m in present if m is not None]
    if not trained:
        raise ValueError(f"no LoRA to fuse into {target.name}")
    hidden = trained[0].down.shape[1]  # q/k/v map hidden -> hidden
    rows = [hidden] * len(target.parts)
    if target.mlp_last:
        rows[-1] = FLUX1_MLP_RATIO * hidden
    for module, count in zip(present, rows):
        if module is not None and module.up.shape[0] != count:
            raise ValueError(
                f"{module.path}: {module.up.shape[0]} outputs, expected {count} to fuse into {target.name}"
            )
    scales = [m.alpha / m.down.shape[0] for m in trained]
    rank = sum(m.down.shape[0] for m in trained)
    same_scale = all(s == scales[0] for s in scales)
    alpha = scales[0] * rank if same_scale else float(rank)
    dtype = torch.promote_types(trained[0].up.dtype, torch.float32)
    down = torch.cat([m.down.to(dtype) for m in trained], dim=0)
    up = torch.zeros(sum(rows), rank, dtype=dtype)
    row = column = 0
    for module, count in zip(present, rows):
        if module is not None:
            part_rank = module.down.shape[0]
            factor = 1.0 if same_scale else (module.alpha / part_rank) * rank / alpha
            up[row : row + count, column : column + part_rank] = module.up.to(dtype) * factor
            column += part_rank
        row += count
    # built in fp32 (for the folded factors), returned in the trained dtype like every other module
    return _LoraModule(
        path=target.name, down=down.to(trained[0].down.dtype), up=up.to(trained[0].up.dtype), alpha=alpha
    )


def _double_qkv(index: str, stream: str, names: tuple[str, ...]) -> FusedTarget:
    return FusedTarget(
        f"double_blocks.{index}.{stream}.qkv", tuple(f"transformer_blocks.{index}.attn.{n}" for n in names)
    )


def _renamed(module: _LoraModule, name: str) -> _LoraModule:
    return _LoraModule(path=name, down=module.down, up=module.up, alpha=module.alpha)


def _split_block(path: str) -> tuple[str, str, str]:
    match = _BLOCK.fullmatch(path)
    if match is None:
        raise ValueError(f"Flux export: {path!r} is outside the transformer blocks; BFL files cannot name it")
    return match.group(1), match.group(2), match.group(3)
