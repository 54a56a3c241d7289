"""Flux LoRA files: key names per format, exact q/k/v fusion, and every file loaded back by diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline, FluxPipeline
from flux_helpers import load_adapter, randomise_lora
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from trainers.export import LoraComponent, _LoraModule, save_diffusers_lora
from trainers.export_flux import (
    FLUX1_MLP_RATIO,
    FusedTarget,
    fuse,
    lora_writer,
    save_flux1_kohya_lora,
    save_klein_bfl_lora,
)
from trainers.models.flow_matching import FluxTrainingOptions
from trainers.tiny_flux import build_tiny_flux, build_tiny_klein

HIDDEN = 32  # the tiny transformers' inner dim (2 heads x 16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux-export-models")
    return {"flux": build_tiny_flux(root / "tiny-flux"), "flux2": build_tiny_klein(root / "tiny-klein")}


# ---------------------------------------------------------------- fusion, on random factors
def _module(
    path: str, rank: int, alpha: float, rows: int, columns: int = HIDDEN, seed: int = 0
) -> _LoraModule:
    generator = torch.Generator().manual_seed(seed)
    return _LoraModule(
        path=path,
        down=torch.randn(rank, columns, generator=generator, dtype=torch.float64).float(),
        up=torch.randn(rows, rank, generator=generator, dtype=torch.float64).float(),
        alpha=alpha,
    )


def _delta(module: _LoraModule) -> torch.Tensor:
    return (module.alpha / module.down.shape[0]) * module.up.double() @ module.down.double()


def test_fused_qkv_equals_the_three_deltas_with_different_ranks_and_alphas() -> None:
    parts = [
        _module("transformer_blocks.0.attn.to_q", rank=4, alpha=8.0, rows=HIDDEN, seed=1),
        _module("transformer_blocks.0.attn.to_k", rank=2, alpha=1.0, rows=HIDDEN, seed=2),
        _module("transformer_blocks.0.attn.to_v", rank=3, alpha=3.0, rows=HIDDEN, seed=3),
    ]
    target = FusedTarget("double_blocks.0.img_attn.qkv", tuple(p.path for p in parts))
    fused = fuse(target, {p.path: p for p in parts})
    assert fused.down.shape == (9, HIDDEN) and fused.up.shape == (3 * HIDDEN, 9)
    expected = torch.cat([_delta(p) for p in parts], dim=0)
    torch.testing.assert_close(_delta(fused), expected, atol=1e-6, rtol=0)
    # block diagonal: q's rows only read q's down rows
    assert not fused.up[:HIDDEN, 4:].any() and not fused.up[HIDDEN : 2 * HIDDEN, :4].any()


def test_same_scale_parts_are_written_unchanged_with_alpha_scale_times_rank() -> None:
    parts = [
        _module(f"transformer_blocks.1.attn.add_{n}_proj", 4, 8.0, HIDDEN, seed=i)
        for i, n in enumerate("qkv")
    ]
    fused = fuse(
        FusedTarget("double_blocks.1.txt_attn.qkv", tuple(p.path for p in parts)), {p.path: p for p in parts}
    )
    assert fused.alpha == 2.0 * 12  # scale 8/4 = 2 at rank 12
    assert torch.equal(fused.down, torch.cat([p.down for p in parts]))
    assert torch.equal(fused.up[HIDDEN : 2 * HIDDEN, 4:8], parts[1].up)


def test_linear1_without_an_mlp_lora_gets_zero_mlp_rows() -> None:
    prefix = "single_transformer_blocks.0."
    parts = [_module(f"{prefix}attn.to_{n}", 4, 4.0, HIDDEN, seed=i) for i, n in enumerate("qkv")]
    target = FusedTarget(
        "single_blocks.0.linear1", (*(p.path for p in parts), f"{prefix}proj_mlp"), mlp_last=True
    )
    fused = fuse(target, {p.path: p for p in parts})
    assert fused.up.shape == ((3 + FLUX1_MLP_RATIO) * HIDDEN, 12)
    expected = torch.cat([*(_delta(p) for p in parts), torch.zeros(FLUX1_MLP_RATIO * HIDDEN, HIDDEN)], dim=0)
    torch.testing.assert_close(_delta(fused), expected.double(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- files from a tiny model's LoRA
def _lora_adapter(family: str, models, tmp_path, targets="all", **lora):
    adapter = load_adapter(
        family, models[family], tmp_path, FluxTrainingOptions(lora_targets=targets), **lora
    )
    adapter.offload_encoders()
    adapter.add_lora()
    for seed, module in enumerate(adapter.lora_modules().values()):
        randomise_lora(module, seed)
    return adapter


def _components(adapter) -> list[LoraComponent]:
    lora = adapter.config.lora
    components = []
    for name, module in adapter.lora_modules().items():
        targets = adapter.lora_target_modules() if name == "transformer" else lora.text_encoder_target_modules
        config = LoraConfig(r=lora.rank, lora_alpha=lora.effective_alpha, target_modules=targets)
        components.append(
            LoraComponent(name, get_peft_model_state_dict(module, adapter_name="default"), config)
        )
    return components


def _inputs(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if family == "flux":
        return {
            "hidden_states": torch.randn(1, 16, 64, generator=generator),
            "encoder_hidden_states": torch.randn(1, 8, 32, generator=generator),
            "pooled_projections": torch.randn(1, 32, generator=generator),
            "timestep": torch.tensor([0.6]),
            "guidance": torch.tensor([1.0]),
            "img_ids": FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
            "txt_ids": torch.zeros(8, 3),
        }
    latents = torch.randn(1, 128, 4, 4, generator=generator)
    text = torch.randn(1, 8, 96, generator=generator)
    return {
        "hidden_states": Flux2KleinPipeline._pack_latents(latents),
        "encoder_hidden_states": text,
        "timestep": torch.tensor([0.6]),
        "img_ids": Flux2KleinPipeline._prepare_latent_ids(latents),
        "txt_ids": Flux2KleinPipeline._prepare_text_ids(text),
    }


@torch.no_grad()
def _velocity(transformer, family: str) -> torch.Tensor:
    return transformer(**_inputs(family), return_dict=False)[0]


@torch.no_grad()
def _clip(text_encoder) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 9, 40, 997]])
    return text_encoder(ids).pooler_output


def _reloaded(family: str, models, file: Path):
    pipeline = (FluxPipeline if family == "flux" else Flux2KleinPipeline).from_pretrained(models[family])
    pipeline.load_lora_weights(str(file.parent), weight_name=file.name)
    return pipeline


def test_flux1_diffusers_file_loads_and_reproduces_transformer_and_clip(models, tmp_path) -> None:
    adapter = _lora_adapter("flux", models, tmp_path, train_text_encoder=True)
    file = save_diffusers_lora(
        tmp_path / "flux-diffusers.safetensors", _components(adapter), adapter.export_metadata()
    )
    keys = load_file(file)
    assert all(k.startswith(("transformer.", "text_encoder.")) for k in keys)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    with safe_open(str(file), "pt") as handle:
        header = handle.metadata()
    assert json.loads(header["lora_adapter_metadata"])["transformer.lora_alpha"] == 8
    assert header["modelspec.architecture"] == "flux-1-dev/lora"

    reloaded = _reloaded("flux", models, file)
    with torch.no_grad():
        baseline = FluxPipeline.from_pretrained(models["flux"]).transformer(
            **_inputs("flux"), return_dict=False
        )[0]
    expected = _velocity(adapter.pipe.transformer, "flux")
    assert (expected - baseline).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(_velocity(reloaded.transformer, "flux"), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        _clip(reloaded.text_encoder), _clip(adapter.pipe.text_encoder), atol=1e-5, rtol=1e-4
    )


def test_flux1_kohya_key_names(models, tmp_path) -> None:
    adapter = _lora_adapter("flux", models, tmp_path, train_text_encoder=True)
    file = save_flux1_kohya_lora(
        tmp_path / "flux-kohya.safetensors", _components(adapter), adapter.export_metadata()
    )
    keys = load_file(file)
    modules = {k.rsplit(".lora_down.weight", 1)[0] for k in keys if k.endswith(".lora_down.weight")}
    double = {
        f"lora_unet_double_blocks_{b}_{n}"
        for b in (0, 1)
        for n in (
            "img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "img_mod_lin",
            "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2", "txt_mod_lin",
        )
    }  # fmt: skip
    single = {
        f"lora_unet_single_blocks_{b}_{n}" for b in (0, 1) for n in ("linear1", "linear2", "modulation_lin")
    }
    clip = {
        f"lora_te1_text_model_encoder_layers_{layer}_self_attn_{n}_proj"
        for layer in (0, 1)
        for n in ("q", "k", "v", "out")
    }
    assert modules == double | single | clip
    assert all(f"{m}.alpha" in keys and f"{m}.lora_up.weight" in keys for m in modules)
    assert keys["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * HIDDEN, 12)
    assert keys["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (
        7 * HIDDEN,
        16,
    )  # q,k,v + mlp(4h)
    with safe_open(str(file), "pt") as handle:
        header = handle.metadata()
    assert header["ss_base_model_version"] == "flux1" and header["ss_network_module"] == "networks.lora_flux"


def test_flux1_kohya_file_fused_deltas_equal_the_trained_ones(models, tmp_path) -> None:
    adapter = _lora_adapter("flux", models, tmp_path)
    file = save_flux1_kohya_lora(tmp_path / "flux-kohya.safetensors", _components(adapter), {})
    keys = load_file(file)

    def delta(name: str) -> torch.Tensor:
        down, up = keys[f"{name}.lora_down.weight"].double(), keys[f"{name}.lora_up.weight"].double()
        return keys[f"{name}.alpha"].item() / down.shape[0] * up @ down

    def trained(path: str) -> torch.Tensor:
        layer = adapter.pipe.transformer.get_submodule(path)
        scale = layer.scaling["default"]
        return scale * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()

    for block in (0, 1):
        qkv = torch.cat([trained(f"transformer_blocks.{block}.attn.to_{n}") for n in "qkv"])
        torch.testing.assert_close(
            delta(f"lora_unet_double_blocks_{block}_img_attn_qkv"), qkv, atol=1e-6, rtol=0
        )
        prefix = f"single_transformer_blocks.{block}."
        linear1 = torch.cat([*(trained(f"{prefix}attn.to_{n}") for n in "qkv"), trained(f"{prefix}proj_mlp")])
        torch.testing.assert_close(
            delta(f"lora_unet_single_blocks_{block}_linear1"), linear1, atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            delta(f"lora_unet_single_blocks_{block}_linear2"), trained(f"{prefix}proj_out"), atol=1e-6, rtol=0
        )


def test_flux1_kohya_double_block_file_loads_in_diffusers_and_reproduces(models, tmp_path) -> None:
    # diffusers' kohya Flux converter hard-codes 3072-wide single blocks, so only double blocks (and CLIP)
    # can go through it on the tiny model; single blocks are checked against the BFL layout above.
    names = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2", "norm1.linear", "norm1_context.linear")  # fmt: skip
    double = [f"transformer_blocks.{block}.{name}" for block in (0, 1) for name in names]
    adapter = _lora_adapter("flux", models, tmp_path, targets=double, train_text_encoder=True)
    file = save_flux1_kohya_lora(tmp_path / "flux-kohya-double.safetensors", _components(adapter), {})
    reloaded = _reloaded("flux", models, file)
    expected = _velocity(adapter.pipe.transformer, "flux")
    plain = FluxPipeline.from_pretrained(models["flux"])
    assert (expected - _velocity(plain.transformer, "flux")).abs().max() > 1e-3  # the LoRA changes both
    assert (_clip(adapter.pipe.text_encoder) - _clip(plain.text_encoder)).abs().max() > 1e-3
    torch.testing.assert_close(_velocity(reloaded.transformer, "flux"), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        _clip(reloaded.text_encoder), _clip(adapter.pipe.text_encoder), atol=1e-5, rtol=1e-4
    )


def test_klein_bfl_key_names(models, tmp_path) -> None:
    adapter = _lora_adapter("flux2", models, tmp_path)
    file = save_klein_bfl_lora(
        tmp_path / "klein.safetensors", _components(adapter), adapter.export_metadata()
    )
    keys = load_file(file)
    modules = {k[: -len(".lora_A.weight")] for k in keys if k.endswith(".lora_A.weight")}
    expected = {
        *(f"diffusion_model.double_blocks.{b}.{n}" for b in (0, 1) for n in (
            "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
            "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")),
        *(f"diffusion_model.single_blocks.{b}.{n}" for b in (0, 1) for n in ("linear1", "linear2")),
        *(f"diffusion_model.{n}.lin" for n in (
            "double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")),
    }  # fmt: skip
    assert modules == expected
    assert len(keys) == 2 * len(expected)  # no alpha tensors: loaders use scale 1, the scale is in lora_B
    with safe_open(str(file), "pt") as handle:
        assert handle.metadata()["ss_base_model_version"] == "flux2_klein_4b"


@pytest.mark.parametrize("writer", [save_klein_bfl_lora, save_diffusers_lora])
def test_klein_files_load_in_diffusers_and_reproduce(writer, models, tmp_path) -> None:
    adapter = _lora_adapter("flux2", models, tmp_path)
    file = writer(tmp_path / "klein.safetensors", _components(adapter), adapter.export_metadata())
    reloaded = _reloaded("flux2", models, file)
    expected = _velocity(adapter.pipe.transformer, "flux2")
    with torch.no_grad():
        baseline = Flux2KleinPipeline.from_pretrained(models["flux2"]).transformer(
            **_inputs("flux2"), return_dict=False
        )[0]
    assert (expected - baseline).abs().max() > 1e-3
    torch.testing.assert_close(_velocity(reloaded.transformer, "flux2"), expected, atol=1e-5, rtol=1e-4)


def test_klein_refuses_a_text_encoder_component(models, tmp_path) -> None:
    adapter = _lora_adapter("flux2", models, tmp_path)
    components = _components(adapter)
    components.append(LoraComponent("text_encoder", components[0].state_dict, components[0].config))
    with pytest.raises(ValueError, match="text-encoder"):
        save_klein_bfl_lora(tmp_path / "klein.safetensors", components, {})


def test_each_family_and_format_has_its_writer() -> None:
    assert lora_writer("flux", "kohya") is save_flux1_kohya_lora
    assert lora_writer("flux2", "kohya") is save_klein_bfl_lora
    assert lora_writer("flux2", "diffusers") is save_diffusers_lora
    with pytest.raises(ValueError, match="saving.formats"):
        lora_writer("flux", "comfy")
    with pytest.raises(ValueError, match="model.family"):
        lora_writer("flux3", "kohya")


def test_klein_file_keeps_the_trained_dtype(models, tmp_path) -> None:
    adapter = _lora_adapter("flux2", models, tmp_path, targets="attention")
    components = _components(adapter)
    components[0].state_dict = {k: v.to(torch.bfloat16) for k, v in components[0].state_dict.items()}
    keys = load_file(save_klein_bfl_lora(tmp_path / "klein-bf16.safetensors", components, {}))
    assert {t.dtype for t in keys.values()} == {torch.bfloat16}
