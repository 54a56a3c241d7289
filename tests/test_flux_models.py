"""Flux.1 and Flux.2 Klein adapters on tiny models loaded through the real loading code."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from diffusers import Flux2KleinPipeline
from flux_helpers import CPU, demo_batch, fixed_loss, load_adapter, make_config
from pydantic import ValidationError
from safetensors.torch import save_file

from ppsf_optim import ProdigyPlusScheduleFree
from trainers.models import adapter_for
from trainers.models.flow_matching import FluxTrainingOptions
from trainers.models.flux import FluxAdapter
from trainers.models.flux2 import Flux2Adapter
from trainers.tiny_flux import (
    build_tiny_flux,
    build_tiny_klein,
    make_tiny_flux_pipeline,
    make_tiny_klein_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux-models")
    return {
        "flux": build_tiny_flux(root / "tiny-flux-dev"),
        "schnell": build_tiny_flux(root / "tiny-flux-schnell", guidance_embeds=False),
        "flux2": build_tiny_klein(root / "tiny-klein-base"),
    }


def test_families_are_registered() -> None:
    assert adapter_for("flux") is FluxAdapter
    assert adapter_for("flux2") is Flux2Adapter
    with pytest.raises(ValueError, match="flux, flux2"):
        adapter_for("flux3")


# ---------------------------------------------------------------- loading
@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_single_transformer_file_plus_folder_loads_the_files_weights(family, models, tmp_path) -> None:
    # a transformer with other weights than the folder's, so the test sees which one was loaded
    other = (
        make_tiny_flux_pipeline(seed=5) if family == "flux" else make_tiny_klein_pipeline(seed=5)
    ).transformer
    file = tmp_path / "transformer.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(file))

    from_folder = load_adapter(family, models[family], tmp_path)
    from_file = load_adapter(family, file, tmp_path, FluxTrainingOptions(components_path=str(models[family])))
    loaded = from_file.pipe.transformer.state_dict()
    for name, value in other.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
    assert not torch.equal(from_folder.pipe.transformer.proj_out.weight, loaded["proj_out.weight"])
    # the rest came from the folder
    torch.testing.assert_close(from_file.pipe.vae.state_dict(), from_folder.pipe.vae.state_dict())


def test_single_file_without_components_path_names_the_field(models, tmp_path) -> None:
    file = tmp_path / "transformer.safetensors"
    save_file({"x": torch.zeros(1)}, str(file))
    with pytest.raises(ValueError, match="flux.components_path"):
        load_adapter("flux", file, tmp_path)


def test_unloadable_folder_says_what_to_give(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="model.path .*components_path"):
        load_adapter("flux2", tmp_path / "missing", tmp_path)


# ---------------------------------------------------------------- latents and text
def test_flux1_latents_are_shifted_and_scaled_vae_samples(models, tmp_path) -> None:
    adapter = load_adapter("flux", models["flux"], tmp_path)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = adapter.encode_images(pixels, torch.Generator().manual_seed(2))
    with torch.no_grad():
        sample = adapter.pipe.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(2))
    torch.testing.assert_close(latents, (sample - 0.1159) * 0.3611)
    assert latents.shape == (1, 16, 8, 8)


def test_klein_latents_match_the_pipelines_own_normalisation(models, tmp_path) -> None:
    adapter = load_adapter("flux2", models["flux2"], tmp_path)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = adapter.encode_images(pixels)
    with torch.no_grad():
        oracle = Flux2KleinPipeline._encode_vae_image(adapter.pipe, pixels, torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, oracle)
    assert latents.shape == (1, 128, 4, 4)
    assert adapter.pipe.vae.bn.running_mean.abs().sum() > 0  # the statistics are not the identity


def test_text_conditioning_shapes(models, tmp_path) -> None:
    flux = load_adapter("flux", models["flux"], tmp_path)
    text = flux.encode_captions(["a red circle", "a blue square"])
    assert text["prompt_embeds"].shape == (2, 32, 32)  # T5 tokens (tiny tokenizer's 32) x d_model
    assert text["pooled"].shape == (2, 32)  # CLIP-L pooled
    klein = load_adapter("flux2", models["flux2"], tmp_path)
    assert klein.encode_captions(["a red circle"])["prompt_embeds"].shape == (1, 64, 96)  # 3 Qwen layers


# ---------------------------------------------------------------- options and errors
def test_guidance_is_only_for_dev(models, tmp_path) -> None:
    with pytest.raises(ValueError, match="flux.guidance"):
        load_adapter("flux", models["schnell"], tmp_path, FluxTrainingOptions(guidance=1.0))
    with pytest.raises(ValueError, match="flux.guidance"):
        load_adapter("flux2", models["flux2"], tmp_path, FluxTrainingOptions(guidance=1.0))
    dev = load_adapter("flux", models["flux"], tmp_path, FluxTrainingOptions(guidance=2.5))
    assert (dev.variant, dev.training_guidance) == ("dev", 2.5)
    assert load_adapter("flux", models["flux"], tmp_path).training_guidance == 1.0
    assert load_adapter("flux", models["schnell"], tmp_path).variant == "schnell"


def test_variant_mismatch_names_the_field(models, tmp_path) -> None:
    with pytest.raises(ValueError, match="flux.variant"):
        load_adapter("flux", models["schnell"], tmp_path, FluxTrainingOptions(variant="dev"))
    with pytest.raises(ValueError, match="flux.variant"):
        load_adapter("flux2", models["flux2"], tmp_path, FluxTrainingOptions(variant="klein"))
    with pytest.raises(ValueError, match="lora.train_text_encoder"):
        load_adapter("flux2", models["flux2"], tmp_path, train_text_encoder=True)


def test_quantization_without_torchao_says_how_to_install(models, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    with pytest.raises(ValueError, match="flux.quantize_base = 'int8' needs torchao: pip install torchao"):
        load_adapter("flux", models["flux"], tmp_path, FluxTrainingOptions(quantize_base="int8"))


def test_unknown_target_set_and_unmatched_module_names_name_the_field(models, tmp_path) -> None:
    with pytest.raises(ValidationError, match="lora_targets"):
        FluxTrainingOptions(lora_targets="mlp-only")
    adapter = load_adapter(
        "flux", models["flux"], tmp_path, FluxTrainingOptions(lora_targets=["no_such_layer"])
    )
    adapter.offload_encoders()
    with pytest.raises(ValueError, match="flux.lora_targets"):
        adapter.add_lora()


FLUX_ATTENTION = {
    *(f"transformer_blocks.{b}.attn.{n}" for b in (0, 1) for n in
      ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")),
    *(f"single_transformer_blocks.{b}.attn.{n}" for b in (0, 1) for n in ("to_q", "to_k", "to_v")),
}  # fmt: skip
FLUX_MLP = {
    *(f"transformer_blocks.{b}.{n}" for b in (0, 1) for n in
      ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")),
    *(f"single_transformer_blocks.{b}.{n}" for b in (0, 1) for n in ("proj_mlp", "proj_out")),
}  # fmt: skip
FLUX_MODULATION = {
    *(f"transformer_blocks.{b}.{n}" for b in (0, 1) for n in ("norm1.linear", "norm1_context.linear")),
    *(f"single_transformer_blocks.{b}.norm.linear" for b in (0, 1)),
}
KLEIN_ATTENTION = {
    *(f"transformer_blocks.{b}.attn.{n}" for b in (0, 1) for n in
      ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")),
    *(f"single_transformer_blocks.{b}.attn.{n}" for b in (0, 1) for n in ("to_qkv_mlp_proj", "to_out")),
}  # fmt: skip
KLEIN_MLP = {
    f"transformer_blocks.{b}.{n}" for b in (0, 1)
    for n in ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
}  # fmt: skip
KLEIN_MODULATION = {
    "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear", "single_stream_modulation.linear"
}  # fmt: skip


@pytest.mark.parametrize(
    ("family", "targets", "expected"),
    [
        ("flux", "attention", FLUX_ATTENTION),
        ("flux", "attention+mlp", FLUX_ATTENTION | FLUX_MLP),
        ("flux", "all", FLUX_ATTENTION | FLUX_MLP | FLUX_MODULATION),
        (
            "flux",
            ["to_q", "ff.net.2"],
            {m for m in FLUX_ATTENTION | FLUX_MLP if m.endswith((".to_q", "ff.net.2"))},
        ),
        ("flux2", "attention", KLEIN_ATTENTION),
        ("flux2", "attention+mlp", KLEIN_ATTENTION | KLEIN_MLP),
        ("flux2", "all", KLEIN_ATTENTION | KLEIN_MLP | KLEIN_MODULATION),
    ],
)
def test_named_target_sets_select_the_listed_layers(family, targets, expected, models, tmp_path) -> None:
    adapter = load_adapter(family, models[family], tmp_path, FluxTrainingOptions(lora_targets=targets))
    adapter.offload_encoders()
    adapter.add_lora()
    adapted = {
        re.sub(r"\.lora_A\.default$", "", name)
        for name, _ in adapter.pipe.transformer.named_modules()
        if name.endswith(".lora_A.default")
    }
    assert adapted == expected


# ---------------------------------------------------------------- training
def _hand_loop(adapter, latents, text, steps: int) -> None:
    adapter.offload_encoders()
    torch.manual_seed(0)
    params = adapter.add_lora()
    optimizer = ProdigyPlusScheduleFree(
        [{"params": p} for p in params.values()], lr=1.0, d0=1e-3, split_groups=False
    )
    generator = torch.Generator().manual_seed(7)
    optimizer.train()
    for _ in range(steps):
        loss = adapter.training_loss(latents, text, None, generator).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    optimizer.eval()  # schedule-free: the averaged weights are the ones that are exported


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("flux", FluxTrainingOptions()),
        (
            "flux",
            FluxTrainingOptions(timestep_sampling="logit_normal", loss_weighting="cosmap", guidance=3.0),
        ),
        ("flux2", FluxTrainingOptions(lora_targets="all", timestep_sampling="uniform", timestep_shift=3.0)),
    ],
)
def test_a_short_hand_loop_lowers_the_loss_on_fixed_noise(family, options, models, tmp_path) -> None:
    adapter = load_adapter(family, models[family], tmp_path, options)
    latents, text = demo_batch(adapter)
    before = fixed_loss(adapter, latents, text)
    _hand_loop(adapter, latents, text, steps=25)
    after = fixed_loss(adapter, latents, text)
    assert after < 0.9 * before, (before, after)


def test_clip_text_encoder_lora_trains_with_the_transformer(models, tmp_path) -> None:
    adapter = load_adapter("flux", models["flux"], tmp_path, train_text_encoder=True)
    latents, _ = demo_batch(adapter)
    adapter.offload_encoders()
    params = adapter.add_lora()
    assert set(params) == {"transformer", "text_encoder"}
    assert set(adapter.lora_modules()) == {"transformer", "text_encoder"}
    assert next(adapter.pipe.text_encoder.parameters()).device == CPU  # kept for encoding while training
    text = adapter.encode_captions(["a red circle", "a blue square"])
    adapter.training_loss(latents, text, None, torch.Generator().manual_seed(0)).mean().backward()
    clip_grads = [p.grad for p in params["text_encoder"]]
    assert all(g is not None for g in clip_grads) and any(g.abs().sum() > 0 for g in clip_grads)


def test_gradient_checkpointing_gives_the_same_gradients(models, tmp_path) -> None:
    grads = []
    for checkpointing in (False, True):
        adapter = load_adapter("flux2", models["flux2"], tmp_path)
        latents, text = demo_batch(adapter)
        adapter.offload_encoders()
        torch.manual_seed(0)
        params = adapter.add_lora()["transformer"]
        if checkpointing:
            adapter.set_gradient_checkpointing()
        adapter.pipe.transformer.train()  # diffusers only checkpoints in training mode
        adapter.training_loss(latents, text, None, torch.Generator().manual_seed(3)).mean().backward()
        grads.append([p.grad.clone() for p in params])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(plain, checkpointed)


# ---------------------------------------------------------------- samples and metadata
@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_samples_are_deterministic_per_seed(family, models, tmp_path) -> None:
    adapter = load_adapter(family, models[family], tmp_path, FluxTrainingOptions(sample_steps=2))
    adapter.offload_encoders()
    first = adapter.sample(["a red circle", "a blue square"], seed=3)
    again = adapter.sample(["a red circle", "a blue square"], seed=3)
    assert [im.size for im in first] == [(64, 64), (64, 64)]
    assert [im.tobytes() for im in first] == [im.tobytes() for im in again]
    assert first[0].tobytes() != first[1].tobytes()
    assert next(adapter.pipe.vae.parameters()).device == CPU  # encoders went back after sampling


def test_export_metadata_uses_the_ecosystems_names(models, tmp_path) -> None:
    assert load_adapter("flux", models["flux"], tmp_path).export_metadata()["modelspec.architecture"] == (
        "flux-1-dev/lora"
    )
    schnell = load_adapter("flux", models["schnell"], tmp_path).export_metadata()
    assert schnell["modelspec.architecture"] == "flux-1-schnell/lora"
    assert schnell["ss_base_model_version"] == "flux1"
    klein = load_adapter("flux2", models["flux2"], tmp_path).export_metadata()
    assert klein["ss_base_model_version"] == "flux2_klein_4b"
    assert klein["modelspec.architecture"] == "Flux.2-klein-4b/lora"


def test_config_for_the_adapter_is_the_shared_schema(models, tmp_path) -> None:
    config = make_config(models["flux"], tmp_path)
    adapter = FluxAdapter(config, CPU)  # no options given: the [flux] section's defaults
    assert adapter.options == FluxTrainingOptions()


# ---------------------------------------------------------------- the objective, as the diffusers examples write it
def _example_sigmas(generator: torch.Generator, batch: int, tokens: int) -> torch.Tensor:
    """logit-normal(0, 1) u, shifted by e^mu with mu = calculate_shift(tokens) (the scheduler's time_shift)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling("logit_normal", batch, 0.0, 1.0, generator=generator)
    mu = calculate_shift(tokens)
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


def test_flux1_loss_is_the_diffusers_example_objective(models, tmp_path) -> None:
    from diffusers import FluxPipeline

    adapter = load_adapter("flux", models["flux"], tmp_path, FluxTrainingOptions(guidance=2.0))
    latents, text = demo_batch(adapter, (1, 4))  # 96 x 64: a swapped height and width would show
    adapter.offload_encoders()
    ours = adapter.training_loss(latents, text, None, torch.Generator().manual_seed(11))

    generator = torch.Generator().manual_seed(11)
    noise = torch.randn(latents.shape, generator=generator)  # the example draws noise first, then u
    batch, channels, height, width = latents.shape
    sigmas = _example_sigmas(generator, batch, (height // 2) * (width // 2)).view(-1, 1, 1, 1)
    noisy = (1 - sigmas) * latents + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
    with torch.no_grad():
        prediction = adapter.pipe.transformer(
            hidden_states=packed,
            timestep=sigmas.flatten() * 1000 / 1000,
            guidance=torch.full((batch,), 2.0),
            pooled_projections=text["pooled"],
            encoder_hidden_states=text["prompt_embeds"],
            txt_ids=torch.zeros(text["prompt_embeds"].shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(
                batch, height // 2, width // 2, "cpu", torch.float32
            ),
            return_dict=False,
        )[0]
    prediction = FluxPipeline._unpack_latents(prediction, height * 8, width * 8, 8)
    expected = ((prediction - (noise - latents)) ** 2).reshape(batch, -1).mean(dim=1)
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-5, atol=1e-6)


def test_klein_loss_is_the_diffusers_example_objective(models, tmp_path) -> None:
    adapter = load_adapter(
        "flux2", models["flux2"], tmp_path, FluxTrainingOptions(loss_weighting="sigma_sqrt")
    )
    latents, text = demo_batch(adapter, (1, 4))  # 96 x 64: a swapped height and width would show
    adapter.offload_encoders()
    ours = adapter.training_loss(latents, text, None, torch.Generator().manual_seed(11))

    generator = torch.Generator().manual_seed(11)
    noise = torch.randn(latents.shape, generator=generator)
    batch, _, height, width = latents.shape
    sigmas = _example_sigmas(generator, batch, height * width).view(-1, 1, 1, 1)
    noisy = (1 - sigmas) * latents + sigmas * noise
    image_ids = Flux2KleinPipeline._prepare_latent_ids(noisy)
    with torch.no_grad():
        prediction = adapter.pipe.transformer(
            hidden_states=Flux2KleinPipeline._pack_latents(noisy),
            encoder_hidden_states=text["prompt_embeds"],
            timestep=sigmas.flatten(),
            img_ids=image_ids,
            txt_ids=Flux2KleinPipeline._prepare_text_ids(text["prompt_embeds"]),
            guidance=None,
            return_dict=False,
        )[0]
    prediction = Flux2KleinPipeline._unpack_latents_with_ids(prediction, image_ids)  # scatter by position id
    weight = sigmas.flatten() ** -2.0  # compute_loss_weighting_for_sd3("sigma_sqrt")
    expected = weight * ((prediction - (noise - latents)) ** 2).reshape(batch, -1).mean(dim=1)
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-5, atol=1e-6)


def test_target_modules_are_known_without_loading_the_model() -> None:
    from trainers.models import transformer_target_modules
    from trainers.models.flux import TARGET_SETS

    assert transformer_target_modules("flux", FluxTrainingOptions(lora_targets="all")) == TARGET_SETS["all"]
    assert transformer_target_modules("flux2", FluxTrainingOptions(lora_targets=["to_q"])) == ["to_q"]
    with pytest.raises(ValueError, match="model.family"):
        transformer_target_modules("sdxl", FluxTrainingOptions())


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_bf16_base_trains_fp32_lora_under_autocast(family, models, tmp_path) -> None:
    config = make_config(models[family], tmp_path).model_copy(deep=True)
    config.training.precision = "bf16"
    adapter = (FluxAdapter if family == "flux" else Flux2Adapter)(config, CPU, options=FluxTrainingOptions())
    adapter.load()
    assert adapter.pipe.transformer.dtype == torch.bfloat16
    latents, text = demo_batch(adapter)
    adapter.offload_encoders()
    params = adapter.add_lora()["transformer"]
    assert {p.dtype for p in params} == {torch.float32}
    loss = adapter.training_loss(latents, text, None, torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert torch.isfinite(loss).all() and loss.dtype == torch.float32
    assert any(p.grad.abs().sum() > 0 for p in params)


def _klein_to_bfl(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Klein transformer state dict under BFL names, as BFL's own files are (fused qkv; the
    LoRA-bearing layers through the export's rename tables, the rest as diffusers' converter reads them)."""
    from trainers.export_flux import _KLEIN_DOUBLE_RENAMES, _KLEIN_GLOBAL_RENAMES, _KLEIN_SINGLE_RENAMES

    norms = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
             "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}  # fmt: skip
    single_norms = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
    outer = {
        "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        **{k: v for k, v in _KLEIN_GLOBAL_RENAMES.items()},
    }  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        module, param = key.rsplit(".", 1)
        match = re.fullmatch(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.(.+)", module)
        if match is None:
            if module == "norm_out.linear":  # diffusers keeps (scale, shift), BFL (shift, scale)
                scale, shift = value.chunk(2)
                out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift, scale])
            else:
                out[f"{outer[module]}.{param}"] = value
            continue
        block, index, rest = match.groups()
        if block == "single_transformer_blocks":
            name = {**_KLEIN_SINGLE_RENAMES, **single_norms}[rest]
            out[f"single_blocks.{index}.{name}.{'scale' if 'norm' in name else param}"] = value
        elif rest in norms:
            out[f"double_blocks.{index}.{norms[rest]}.scale"] = value
        elif rest in _KLEIN_DOUBLE_RENAMES:
            out[f"double_blocks.{index}.{_KLEIN_DOUBLE_RENAMES[rest]}.{param}"] = value
        elif rest in ("attn.to_q", "attn.add_q_proj"):
            stream, names = ("img_attn", ("to_q", "to_k", "to_v")) if rest == "attn.to_q" else (
                "txt_attn", ("add_q_proj", "add_k_proj", "add_v_proj"))  # fmt: skip
            parts = [state_dict[f"{block}.{index}.attn.{n}.{param}"] for n in names]
            out[f"double_blocks.{index}.{stream}.qkv.{param}"] = torch.cat(parts)
    return out


def test_klein_single_file_in_bfl_names_loads(models, tmp_path) -> None:
    other = make_tiny_klein_pipeline(seed=9).transformer
    file = tmp_path / "flux-2-klein-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in _klein_to_bfl(other.state_dict()).items()}, str(file))
    adapter = load_adapter("flux2", file, tmp_path, FluxTrainingOptions(components_path=str(models["flux2"])))
    loaded = adapter.pipe.transformer.state_dict()
    assert loaded.keys() == other.state_dict().keys()
    for name, value in other.state_dict().items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_fused_backward_pass_equals_the_plain_step(family, models, tmp_path) -> None:
    results = []
    for fused in (False, True):
        adapter = load_adapter(family, models[family], tmp_path)
        latents, text = demo_batch(adapter)
        adapter.offload_encoders()
        torch.manual_seed(0)
        params = adapter.add_lora()["transformer"]
        adapter.set_gradient_checkpointing()
        adapter.pipe.transformer.train()
        optimizer = ProdigyPlusScheduleFree([{"params": params}], lr=1.0, d0=1e-3)
        if fused:
            optimizer.attach_fused_backward()
        generator = torch.Generator().manual_seed(5)
        for _ in range(4):
            adapter.training_loss(latents, text, None, generator).mean().backward()
            optimizer.step()  # with the fused pass this ends the step the backward pass left open
            if not fused:
                optimizer.zero_grad(set_to_none=True)
        results.append([p.detach().clone() for p in params])
    for plain, fused_param in zip(*results):
        torch.testing.assert_close(fused_param, plain, rtol=1e-5, atol=1e-7)
