"""Samples from prompts encoded before training: the same images as the pipeline makes from the prompt
itself, and no frozen text encoder runs (or needs the device) while denoising. Every family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flux_helpers import ADAPTERS, CPU

from trainers.config import validate_config
from trainers.models.sdxl import SDXLAdapter
from trainers.tiny_flux import build_tiny_flux, build_tiny_klein
from trainers.tiny_models import build_tiny_sdxl

PROMPTS = ["a red circle", "a blue square"]
SEED = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sample-models")
    return {
        "flux": build_tiny_flux(root / "tiny-flux-dev"),
        "flux2": build_tiny_klein(root / "tiny-klein-base"),  # the base model samples with CFG
        "sdxl": build_tiny_sdxl(root / "tiny-sdxl"),
    }


def load(family: str, model: Path, tmp_path: Path, **lora):
    sections = {"flux": {"sample_steps": 2}} if family != "sdxl" else {}
    config = validate_config(
        {
            "name": "samples",
            "output_dir": str(tmp_path / "runs"),
            "model": {"family": family, "path": str(model)},
            "dataset": {"path": str(tmp_path), "resolution": 64},
            "lora": {"rank": 4, "alpha": 4, **lora},
            "training": {"max_steps": 1, "precision": "fp32", "seed": 7},
            "sampling": {"prompts": PROMPTS, "steps": 2, "guidance": 5.0},
            **sections,
        }
    )
    adapter = (SDXLAdapter if family == "sdxl" else ADAPTERS[family])(config, CPU)
    adapter.load()
    return adapter


def pipeline_from_prompts(adapter) -> list[bytes]:
    """The images as the pipeline makes them from the prompt text itself (how samples were made before)."""
    images = []
    with torch.no_grad():
        for index, prompt in enumerate(PROMPTS):
            generator = torch.Generator().manual_seed(SEED + index)
            if isinstance(adapter, SDXLAdapter):
                sampling = adapter.config.sampling
                latents = adapter.pipe(
                    prompt,
                    num_inference_steps=sampling.steps,
                    guidance_scale=sampling.guidance,
                    width=64,
                    height=64,
                    generator=generator,
                    output_type="latent",
                ).images
                images.append(adapter._decode(latents)[0])
            else:
                steps, guidance = adapter._sample_settings()
                images += adapter.pipe(
                    prompt=prompt,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    width=64,
                    height=64,
                    generator=generator,
                    max_sequence_length=adapter.max_sequence_length,
                ).images
    return [image.tobytes() for image in images]


def text_encoders(adapter) -> dict[str, torch.nn.Module]:
    names = ("text_encoder", "text_encoder_2") if isinstance(adapter, SDXLAdapter) else adapter.text_encoders
    return {name: getattr(adapter.pipe, name) for name in names}


def count_calls(modules: dict[str, torch.nn.Module]) -> dict[str, int]:
    calls = dict.fromkeys(modules, 0)
    for name, module in modules.items():
        module.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def trained_lora(adapter) -> None:
    """LoRA on, with non-zero up weights, so the samples show it."""
    torch.manual_seed(0)
    for params in adapter.add_lora().values():
        for param in params:
            param.data.normal_(0, 0.05)
    for module in adapter.lora_modules().values():
        module.eval()


@pytest.mark.parametrize("family", ["flux", "flux2", "sdxl"])
def test_prepared_samples_equal_the_pipelines_and_run_no_text_encoder(family, models, tmp_path) -> None:
    adapter = load(family, models[family], tmp_path)
    adapter.prepare_samples(PROMPTS)
    adapter.offload_encoders()
    trained_lora(adapter)
    expected = pipeline_from_prompts(adapter)
    calls = count_calls(text_encoders(adapter))
    images = adapter.sample(PROMPTS, SEED)
    assert [image.tobytes() for image in images] == expected
    assert images[0].tobytes() != images[1].tobytes()
    assert calls == dict.fromkeys(calls, 0)  # the frozen encoders stayed off: nothing re-encoded
    # a prompt prepare_samples never saw is encoded when sampled, and gives the same image
    calls_before = dict(calls)
    assert [image.tobytes() for image in adapter.sample(PROMPTS[::-1], SEED + 1)][::-1] != expected
    assert calls == calls_before  # both known; reversed order only changes the seeds
    new = adapter.sample(["a green triangle"], SEED)
    assert new[0].size == (64, 64) and any(calls.values())


@pytest.mark.parametrize("family", ["flux", "sdxl"])
def test_a_trained_text_encoder_is_used_with_its_current_weights(family, models, tmp_path) -> None:
    adapter = load(family, models[family], tmp_path, train_text_encoder=True)
    adapter.prepare_samples(PROMPTS)
    adapter.offload_encoders()
    trained_lora(adapter)  # the text encoder's LoRA changes its output after the prompts were prepared
    expected = pipeline_from_prompts(adapter)
    calls = count_calls(text_encoders(adapter))
    assert [image.tobytes() for image in adapter.sample(PROMPTS, SEED)] == expected
    if family == "flux":  # CLIP-L trains and is re-run; T5 is frozen and its embeddings are reused
        assert calls == {"text_encoder": len(PROMPTS), "text_encoder_2": 0}
    else:
        assert all(calls.values())
