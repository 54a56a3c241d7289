"""8-bit base weights via torchao (int8 / float8 weight-only) under PEFT LoRA, on the tiny Flux.1 model."""

from __future__ import annotations

import pytest
import torch
from flux_helpers import demo_batch, fixed_loss, load_adapter
from test_flux_models import _hand_loop

from trainers.models.flow_matching import FluxTrainingOptions, check_quantization
from trainers.tiny_flux import build_tiny_flux

torchao = pytest.importorskip("torchao", reason="torchao is not installed (pip install torchao)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("flux-quantized") / "tiny-flux")


@pytest.mark.parametrize("kind", ["int8", "float8"])
def test_quantized_base_trains_and_tracks_the_full_precision_loss(kind, model, tmp_path) -> None:
    full = load_adapter("flux", model, tmp_path)
    latents, text = demo_batch(full)
    quantized = load_adapter("flux", model, tmp_path, FluxTrainingOptions(quantize_base=kind))
    weight = quantized.pipe.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight) is not torch.nn.Parameter or type(weight.data) is not torch.Tensor  # a torchao tensor
    assert (
        type(quantized.pipe.transformer.proj_out.weight.data) is torch.Tensor
    )  # outside the blocks: as loaded

    full_loss, quantized_loss = fixed_loss(full, latents, text), fixed_loss(quantized, latents, text)
    assert quantized_loss == pytest.approx(full_loss, rel=0.05)

    _hand_loop(quantized, latents, text, steps=25)
    assert fixed_loss(quantized, latents, text) < 0.9 * quantized_loss


def test_lora_gradients_reach_post_accumulate_hooks_with_an_int8_base(model, tmp_path) -> None:
    adapter = load_adapter("flux", model, tmp_path, FluxTrainingOptions(quantize_base="int8"))
    latents, text = demo_batch(adapter)
    adapter.offload_encoders()
    params = adapter.add_lora()["transformer"]
    fired = set()
    for param in params:
        param.register_post_accumulate_grad_hook(lambda p: fired.add(id(p)))
    adapter.training_loss(latents, text, None, torch.Generator().manual_seed(0)).mean().backward()
    assert fired == {id(p) for p in params}  # what the fused backward pass relies on


def test_float8_needs_a_recent_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    with pytest.raises(ValueError, match=r"flux.quantize_base = 'float8' .* 8\.9"):
        check_quantization(FluxTrainingOptions(quantize_base="float8"), torch.device("cuda"))
    check_quantization(FluxTrainingOptions(quantize_base="int8"), torch.device("cuda"))
