"""LoRA export (trainers/export.py): both file layouts reload exactly in diffusers, alpha != rank included."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import trainers.export as export
from trainers.export import (
    LoraComponent,
    kohya_prefix,
    read_lora_metadata,
    save_diffusers_lora,
    save_kohya_lora,
)
from trainers.tiny_models import make_tiny_sdxl_pipeline

PROMPT = "a red circle on a blue background"
RANK = 4
ALPHA = 8  # != RANK on purpose: a loader that drops alpha scales by 1 instead of 2
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
CALLER_METADATA = {
    "ss_base_model_version": "sdxl_base_v1-0",
    "ss_steps": "120",
    "ss_resolution": "(64, 64)",
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "ppsf.note": "ünïcode, commas, {braces}",
}
EXACT_ATOL = 1e-5
LORA_EFFECT_MIN = 1e-3
SAVERS = {"diffusers": save_diffusers_lora, "kohya": save_kohya_lora}


@dataclass
class Trained:
    """A tiny SDXL pipeline with LoRA on all three components, and what it and the base produce."""

    pipe: StableDiffusionXLPipeline
    components: list[LoraComponent]
    base_image: np.ndarray
    lora_image: np.ndarray
    base_embeds: torch.Tensor
    lora_embeds: torch.Tensor


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Run this module's torch ops on one thread (the models are tiny; threads only add overhead)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unet_config(**overrides) -> LoraConfig:
    """Return the trainer's UNet LoraConfig (r=4, alpha=8) with ``overrides`` applied."""
    kwargs = dict(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
    return LoraConfig(**{**kwargs, **overrides})


def _text_config() -> LoraConfig:
    """Return the trainer's text-encoder LoraConfig (r=4, alpha=8)."""
    return LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TEXT_TARGETS)


def _randomize_lora_b(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every lora_B a random non-zero value (fresh adapters start at B = 0, i.e. no effect)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def _add_lora(pipe: StableDiffusionXLPipeline, unet_config: LoraConfig, text: bool) -> list[LoraComponent]:
    """Add seeded non-zero LoRA adapters to the UNet (and both text encoders); return the export components."""
    pipe.unet.add_adapter(unet_config)
    components = [LoraComponent("unet", {}, unet_config)]
    if text:
        for name in TEXT_ENCODERS:
            # transformers 5.24's PreTrainedModel.add_adapter demands peft >= 0.22; the pinned 0.21.2
            # is refused, so inject with peft directly (same adapter name and layers).
            config = _text_config()
            inject_adapter_in_model(config, getattr(pipe, name), adapter_name="default")
            components.append(LoraComponent(name, {}, config))
    generator = torch.Generator().manual_seed(1234)
    for component in components:
        module = getattr(pipe, component.name)
        _randomize_lora_b(module, generator)
        component.state_dict = get_peft_model_state_dict(module)
    return components


def _generate(pipe: StableDiffusionXLPipeline) -> np.ndarray:
    """Return a 64x64 image from 2 Euler steps with a fixed generator."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(
        PROMPT, num_inference_steps=2, height=64, width=64, generator=generator, output_type="np"
    ).images


def _embeds(pipe: StableDiffusionXLPipeline) -> torch.Tensor:
    """Return the prompt embeddings (both text encoders concatenated), to check the text-encoder LoRAs."""
    with torch.no_grad():
        embeds, *_ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    return embeds


def _max_diff(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Return max |a - b|."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def trained() -> Trained:
    """The in-memory LoRA pipeline and its reference outputs, built once for the module."""
    base = make_tiny_sdxl_pipeline(seed=0)
    base_image, base_embeds = _generate(base), _embeds(base)
    pipe = make_tiny_sdxl_pipeline(seed=0)
    components = _add_lora(pipe, _unet_config(), text=True)
    return Trained(pipe, components, base_image, _generate(pipe), base_embeds, _embeds(pipe))


def _reload(folder: Path, file: Path, via_folder: bool) -> StableDiffusionXLPipeline:
    """Return a fresh tiny pipeline (no adapters) with the LoRA file loaded by diffusers."""
    pipe = make_tiny_sdxl_pipeline(seed=0)
    if via_folder:
        pipe.load_lora_weights(str(folder), weight_name=file.name)
    else:
        pipe.load_lora_weights(str(file))
    return pipe


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """Return every tensor in a safetensors file."""
    return load_file(str(path))


def _clip_rooted(component_name: str, key: str) -> str:
    """Return ``key`` rooted at ``text_model.`` for a text encoder, as ComfyUI and A1111 name CLIP layers.

    transformers 5 flattened CLIPTextModel (keys start at ``encoder.``) but not CLIPTextModelWithProjection.
    """
    if component_name in TEXT_ENCODERS and not key.startswith("text_model."):
        return "text_model." + key
    return key


def _module_paths(component: LoraComponent) -> set[str]:
    """Return the PEFT module paths (keys without ``.lora_A.weight``) of a component."""
    suffix = ".lora_A.weight"
    return {key[: -len(suffix)] for key in component.state_dict if key.endswith(suffix)}


# --------------------------------------------------------------------------------------------------
# Round trips through diffusers' load_lora_weights
# --------------------------------------------------------------------------------------------------


def test_the_lora_changes_both_image_and_prompt_embeddings(trained: Trained) -> None:
    assert _max_diff(trained.lora_image, trained.base_image) > LORA_EFFECT_MIN
    assert _max_diff(trained.lora_embeds, trained.base_embeds) > LORA_EFFECT_MIN


@pytest.mark.parametrize("via_folder", [True, False], ids=["folder+weight_name", "file"])
@pytest.mark.parametrize("fmt", sorted(SAVERS))
def test_reloaded_file_reproduces_the_in_memory_lora(
    trained: Trained, tmp_path: Path, fmt: str, via_folder: bool
) -> None:
    file = SAVERS[fmt](tmp_path / f"lora_{fmt}.safetensors", trained.components, CALLER_METADATA)
    pipe = _reload(tmp_path, file, via_folder)

    # Embeddings isolate the two text encoders' LoRAs; the image adds the UNet's.
    assert _max_diff(_embeds(pipe), trained.lora_embeds) <= EXACT_ATOL
    image = _generate(pipe)
    assert _max_diff(image, trained.lora_image) <= EXACT_ATOL
    assert _max_diff(image, trained.base_image) > LORA_EFFECT_MIN


_DIFFUSERS_KOHYA_ALPHA_PATTERN_GAP = pytest.mark.xfail(
    strict=True,
    reason="diffusers 0.42.1 builds the UNet alpha_pattern from kohya .alpha keys in its old "
    "'processor.to_q_lora.down.weight' spelling, which matches no module, so every UNet module gets the "
    "majority alpha. The file itself is right (see test_kohya_alpha_for_rslora_and_alpha_pattern...).",
)


@pytest.mark.parametrize(
    ("fmt", "overrides"),
    [
        ("diffusers", {"use_rslora": True}),
        ("kohya", {"use_rslora": True}),
        ("diffusers", {"alpha_pattern": {"to_q": 2}}),
        pytest.param("kohya", {"alpha_pattern": {"to_q": 2}}, marks=_DIFFUSERS_KOHYA_ALPHA_PATTERN_GAP),
    ],
    ids=["diffusers-rslora", "kohya-rslora", "diffusers-alpha_pattern", "kohya-alpha_pattern"],
)
def test_rslora_and_alpha_pattern_reload_exactly(tmp_path: Path, fmt: str, overrides: dict) -> None:
    # rsLoRA's alpha / sqrt(r) scale and per-module alphas both have to survive the file format.
    pipe = make_tiny_sdxl_pipeline(seed=0)
    components = _add_lora(pipe, _unet_config(**overrides), text=False)
    expected = _generate(pipe)

    file = SAVERS[fmt](tmp_path / "lora.safetensors", components, {})
    image = _generate(_reload(tmp_path, file, via_folder=False))

    assert _max_diff(image, expected) <= EXACT_ATOL


# --------------------------------------------------------------------------------------------------
# File layouts
# --------------------------------------------------------------------------------------------------


def test_diffusers_keys_are_component_prefixed_peft_keys(trained: Trained, tmp_path: Path) -> None:
    file = save_diffusers_lora(tmp_path / "lora.safetensors", trained.components, {})
    tensors = _tensors(file)

    expected: dict[str, torch.Tensor] = {}
    for component in trained.components:
        for key, value in component.state_dict.items():
            expected[f"{component.name}.{_clip_rooted(component.name, key)}"] = value
    assert sorted(tensors) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(tensors[key], value), key
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in tensors
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in tensors
    assert "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj.lora_A.weight" in tensors


def test_diffusers_header_matches_diffusers_own_writer(trained: Trained, tmp_path: Path) -> None:
    ours = save_diffusers_lora(tmp_path / "ours.safetensors", trained.components, CALLER_METADATA)
    by_name = {component.name: component for component in trained.components}
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "reference",
        **{f"{name}_lora_layers": by_name[name].state_dict for name in ("unet", *TEXT_ENCODERS)},
        **{
            f"{name}_lora_adapter_metadata": by_name[name].config.to_dict()
            for name in ("unet", *TEXT_ENCODERS)
        },
    )
    reference = read_lora_metadata(tmp_path / "reference" / "pytorch_lora_weights.safetensors")

    header = read_lora_metadata(ours)
    ours_json, reference_json = (json.loads(h.pop("lora_adapter_metadata")) for h in (header, reference))
    assert header == {**reference, **CALLER_METADATA}
    # diffusers writes list(set), whose order varies from run to run; ours is sorted.
    for key, value in reference_json.items():
        if key.endswith("target_modules"):
            reference_json[key] = sorted(value)
    assert ours_json == reference_json
    assert (ours_json["unet.r"], ours_json["unet.lora_alpha"]) == (RANK, ALPHA)
    assert ours_json["text_encoder_2.lora_alpha"] == ALPHA


def test_kohya_names_triples_and_alpha(trained: Trained, tmp_path: Path) -> None:
    tensors = _tensors(save_kohya_lora(tmp_path / "lora.safetensors", trained.components, {}))

    for name in (
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_1_self_attn_out_proj",
    ):
        assert f"{name}.lora_down.weight" in tensors, name

    expected_names = set()
    for component in trained.components:
        for path in _module_paths(component):
            expected_names.add(
                kohya_prefix(component.name) + _clip_rooted(component.name, path).replace(".", "_")
            )
    expected_keys = {
        f"{n}.{s}" for n in expected_names for s in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert set(tensors) == expected_keys

    for name in expected_names:
        down, up, alpha = (tensors[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert down.shape[0] == RANK and up.shape[1] == RANK, name
        assert alpha.shape == () and alpha.item() == float(ALPHA), name


def test_kohya_values_are_the_peft_factors(trained: Trained, tmp_path: Path) -> None:
    tensors = _tensors(save_kohya_lora(tmp_path / "lora.safetensors", trained.components, {}))
    unet = trained.components[0].state_dict
    path = "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
    name = "lora_unet_" + path.replace(".", "_")
    assert torch.equal(tensors[f"{name}.lora_down.weight"], unet[f"{path}.lora_A.weight"])
    assert torch.equal(tensors[f"{name}.lora_up.weight"], unet[f"{path}.lora_B.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", sorted(SAVERS))
def test_weights_are_written_contiguous_in_the_requested_dtype(
    trained: Trained, tmp_path: Path, fmt: str, dtype: torch.dtype
) -> None:
    tensors = _tensors(SAVERS[fmt](tmp_path / "lora.safetensors", trained.components, {}, dtype=dtype))
    weights = {key: value for key, value in tensors.items() if not key.endswith(".alpha")}
    assert weights and all(value.dtype == dtype and value.is_contiguous() for value in weights.values())
    # alpha stays float32 so any value survives exactly, whatever the weight dtype.
    assert all(value.dtype == torch.float32 for key, value in tensors.items() if key.endswith(".alpha"))
    source = trained.components[0].state_dict[
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight"
    ]
    written_key = {
        "diffusers": "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight",
        "kohya": "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k.lora_up.weight",
    }[fmt]
    assert torch.equal(tensors[written_key], source.to(dtype))


def test_kohya_alpha_for_rslora_and_alpha_pattern_and_dynamic_metadata(tmp_path: Path) -> None:
    config = LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"to_q": 2}, target_modules=UNET_TARGETS
    )
    state = {
        f"blk.{module}.{factor}.weight": torch.ones(shape)
        for module in ("to_q", "to_k")
        for factor, shape in (("lora_A", (4, 3)), ("lora_B", (5, 4)))
    }
    file = save_kohya_lora(tmp_path / "lora.safetensors", [LoraComponent("unet", state, config)], {})

    tensors = _tensors(file)
    # rsLoRA scales by alpha / sqrt(r); kohya by alpha / r, so the written alpha is alpha * sqrt(r).
    assert tensors["lora_unet_blk_to_k.alpha"].item() == pytest.approx(8 * math.sqrt(4))
    assert tensors["lora_unet_blk_to_q.alpha"].item() == pytest.approx(2 * math.sqrt(4))
    header = read_lora_metadata(file)
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("4", "Dynamic")


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------


def test_diffusers_metadata_round_trips(trained: Trained, tmp_path: Path) -> None:
    header = read_lora_metadata(
        save_diffusers_lora(tmp_path / "l.safetensors", trained.components, CALLER_METADATA)
    )
    assert set(header) == {*CALLER_METADATA, "format", "lora_adapter_metadata"}
    assert {key: header[key] for key in CALLER_METADATA} == CALLER_METADATA
    assert header["format"] == "pt"


def test_kohya_metadata_round_trips_with_network_defaults(trained: Trained, tmp_path: Path) -> None:
    header = read_lora_metadata(
        save_kohya_lora(tmp_path / "l.safetensors", trained.components, CALLER_METADATA)
    )
    assert header == {
        **CALLER_METADATA,
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(RANK),
        "ss_network_alpha": str(float(ALPHA)),
    }


def test_kohya_caller_metadata_wins_over_defaults(trained: Trained, tmp_path: Path) -> None:
    given = {"ss_network_dim": "16", "ss_network_alpha": "1", "ss_network_module": "lycoris.kohya"}
    header = read_lora_metadata(save_kohya_lora(tmp_path / "l.safetensors", trained.components, given))
    assert {key: header[key] for key in given} == given


def test_read_lora_metadata_of_a_file_without_metadata(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    assert read_lora_metadata(tmp_path / "plain.safetensors") == {}


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def _failing_save(filename, tensors, metadata=None) -> None:
    """Stand-in for write_safetensors that leaves a truncated file behind and fails."""
    Path(filename).write_bytes(b"\x08\x00\x00partial")
    raise OSError("disk full")


@pytest.mark.parametrize("fmt", sorted(SAVERS))
def test_failed_write_keeps_the_older_file_and_leaves_no_temp(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    target = SAVERS[fmt](tmp_path / "lora.safetensors", trained.components, {"ss_steps": "1"})
    before = target.read_bytes()

    monkeypatch.setattr(export, "write_safetensors", _failing_save)
    with pytest.raises(OSError, match="disk full"):
        SAVERS[fmt](target, trained.components, {"ss_steps": "2"})

    assert target.read_bytes() == before
    assert read_lora_metadata(target)["ss_steps"] == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


@pytest.mark.parametrize("fmt", sorted(SAVERS))
def test_failed_first_write_leaves_nothing(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    monkeypatch.setattr(export, "write_safetensors", _failing_save)
    with pytest.raises(OSError):
        SAVERS[fmt](tmp_path / "out" / "lora.safetensors", trained.components, {})
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("fmt", sorted(SAVERS))
def test_overwrite_replaces_the_file(trained: Trained, tmp_path: Path, fmt: str) -> None:
    target = tmp_path / "lora.safetensors"
    SAVERS[fmt](target, trained.components, {"ss_steps": "1"})
    SAVERS[fmt](target, trained.components, {"ss_steps": "2"})
    assert read_lora_metadata(target)["ss_steps"] == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _component(name: str, state: dict[str, tuple[int, ...]], r: int = 4) -> LoraComponent:
    """Return a component whose tensors have the given shapes, with a LoraConfig of rank ``r``."""
    tensors = {key: torch.randn(shape) for key, shape in state.items()}
    return LoraComponent(name, tensors, LoraConfig(r=r, lora_alpha=8, target_modules=TEXT_TARGETS))


_LAYER = "encoder.layers.0.self_attn.q_proj"
_BAD_COMPONENTS = {
    "A without B": ({f"{_LAYER}.lora_A.weight": (4, 32)}, "without"),
    "B without A": ({f"{_LAYER}.lora_B.weight": (32, 4)}, "without"),
    "rank differs from config": (
        {f"{_LAYER}.lora_A.weight": (2, 32), f"{_LAYER}.lora_B.weight": (32, 2)},
        "rank 4",
    ),
    "A and B ranks differ": (
        {f"{_LAYER}.lora_A.weight": (4, 32), f"{_LAYER}.lora_B.weight": (32, 3)},
        "rank 4",
    ),
    "no LoRA weights": ({}, "no lora_A"),
}


@pytest.mark.parametrize("case", sorted(_BAD_COMPONENTS))
@pytest.mark.parametrize("fmt", sorted(SAVERS))
def test_inconsistent_component_raises_naming_it(tmp_path: Path, fmt: str, case: str) -> None:
    state, message = _BAD_COMPONENTS[case]
    good = _component("unet", {"m.lora_A.weight": (4, 8), "m.lora_B.weight": (8, 4)})
    bad = _component("text_encoder_2", state)
    with pytest.raises(ValueError, match=f"'text_encoder_2'.*{message}"):
        SAVERS[fmt](tmp_path / "lora.safetensors", [good, bad], {})
    assert list(tmp_path.iterdir()) == []


def test_consistent_synthetic_component_is_accepted(tmp_path: Path) -> None:
    # The control for the cases above: the same shapes with matching ranks go through.
    state = {f"{_LAYER}.lora_A.weight": (4, 32), f"{_LAYER}.lora_B.weight": (32, 4)}
    for fmt, save in SAVERS.items():
        assert save(tmp_path / f"{fmt}.safetensors", [_component("text_encoder_2", state)], {}).is_file()


@pytest.mark.parametrize(
    ("components", "metadata", "file_name", "message"),
    [
        ([], {}, "l.safetensors", "no LoRA component"),
        (["unet", "unet"], {}, "l.safetensors", "more than once: unet"),
        (["unet"], {}, "l.bin", "must end in .safetensors"),
        (["unet"], {"ss_steps": 10}, "l.safetensors", "must be strings"),
        (["unet"], {"lora_adapter_metadata": "{}"}, "l.safetensors", "reserved"),
        (["unet"], {"format": "tf"}, "l.safetensors", "reserved"),
    ],
)
@pytest.mark.parametrize("fmt", sorted(SAVERS))
def test_bad_arguments_raise(tmp_path: Path, fmt: str, components, metadata, file_name, message) -> None:
    state = {"m.lora_A.weight": (4, 8), "m.lora_B.weight": (8, 4)}
    with pytest.raises(ValueError, match=message):
        SAVERS[fmt](tmp_path / file_name, [_component(name, state) for name in components], metadata)
    assert list(tmp_path.iterdir()) == []


def test_kohya_rejects_what_it_cannot_express(tmp_path: Path) -> None:
    state = {"m.lora_A.weight": (4, 8), "m.lora_B.weight": (8, 4)}
    with pytest.raises(NotImplementedError, match="Flux"):
        save_kohya_lora(tmp_path / "l.safetensors", [_component("transformer", state)], {})
    with pytest.raises(ValueError, match="no kohya prefix"):
        save_kohya_lora(tmp_path / "l.safetensors", [_component("prior", state)], {})
    dora = _component("unet", state)
    dora.config.use_dora = True
    with pytest.raises(ValueError, match="DoRA"):
        save_kohya_lora(tmp_path / "l.safetensors", [dora], {})
    extra = _component("unet", {**state, "m.lora_magnitude_vector": (8,)})
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        save_kohya_lora(tmp_path / "l.safetensors", [extra], {})
    assert list(tmp_path.iterdir()) == []


def test_kohya_prefix() -> None:
    assert [kohya_prefix(n) for n in ("unet", "text_encoder", "text_encoder_2", "transformer")] == [
        "lora_unet_",
        "lora_te1_",
        "lora_te2_",
        "lora_unet_",
    ]
    with pytest.raises(ValueError, match="no kohya prefix"):
        kohya_prefix("vae")
