"""The memory estimate for Flux.1 and Flux.2 Klein (trainers/models/flux_memory.py): the bundled configs
against the published parameter counts, the meta-device measurement against a real CPU step of the same tiny
model, 8-bit bases, and every Flux preset against its card."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from trainers.config import TrainConfig, load_config, validate_config
from trainers.memory import estimate
from trainers.memory.estimate import GIB
from trainers.memory.measure import DeviceEmulation
from trainers.memory.measurements import _training_step
from trainers.models import memory_model_for
from trainers.models.flux_memory import Flux2MemoryModel, FluxMemoryModel
from trainers.tiny_flux import make_tiny_flux_pipeline, make_tiny_klein_pipeline

PRESETS = Path(__file__).resolve().parent.parent / "presets"
TINY = {"flux": ("demo://tiny-flux", FluxMemoryModel), "flux2": ("demo://tiny-klein", Flux2MemoryModel)}


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPSF_MEMORY_CACHE", str(tmp_path / "memory-cache"))
    monkeypatch.setenv("PPSF_DEMO_DIR", str(tmp_path / "demo"))
    torch.set_num_threads(1)


def flux_config(family: str, path: str | None = None, **sections) -> TrainConfig:
    data = {
        "name": "t",
        "model": {"family": family, "path": path or TINY[family][0]},
        "dataset": {"path": "demo://shapes", "resolution": 64},
        "lora": {"rank": 4},
        "training": {"max_steps": 1, "batch_size": 2, "precision": "fp32"},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return validate_config(data)


def test_memory_model_for_the_flux_families() -> None:
    assert memory_model_for("flux") is FluxMemoryModel
    assert memory_model_for("flux2") is Flux2MemoryModel


@pytest.mark.parametrize(
    "family, path, expected",
    [
        # black-forest-labs/FLUX.1-dev: transformer 11.90 B (schnell: no guidance embedder, 10.2 M less),
        # CLIP ViT-L text 123.06 M, T5-XXL encoder 4.762 B, VAE 83.8 M
        (
            "flux",
            "black-forest-labs/FLUX.1-dev",
            {"transformer": 11.90e9, "text_encoder": 123.06e6, "text_encoder_2": 4.762e9, "vae": 83.8e6},
        ),
        (
            "flux",
            "black-forest-labs/FLUX.1-schnell",
            {"transformer": 11.89e9, "text_encoder": 123.06e6, "text_encoder_2": 4.762e9, "vae": 83.8e6},
        ),
        # Klein 4B / 9B: the flow models the names count; Qwen3-4B 4.02 B and Qwen3-8B 8.19 B (their cards)
        ("flux2", "black-forest-labs/FLUX.2-klein-base-4B", {"transformer": 3.9e9, "text_encoder": 4.02e9}),
        ("flux2", "black-forest-labs/FLUX.2-klein-base-9B", {"transformer": 9.1e9, "text_encoder": 8.19e9}),
    ],
    ids=["flux1-dev", "flux1-schnell", "klein-4b", "klein-9b"],
)
def test_bundled_configs_give_the_published_parameter_counts(family: str, path: str, expected: dict) -> None:
    model = memory_model_for(family)(flux_config(family, path, training={"precision": "bf16"}), "cuda")
    counts = {c.name: c.params for c in model.components()}
    for name, published in expected.items():
        assert counts[name] == pytest.approx(published, rel=0.01), name
    assert "bundled" in model.architecture_source


def test_flux1_dev_counts_exactly() -> None:
    """The exact counts of the diffusers checkpoints (transformer 11,901,408,320; T5 encoder 4,762,310,656)."""
    model = FluxMemoryModel(flux_config("flux", "black-forest-labs/FLUX.1-dev"), "cuda")
    counts = {c.name: c.params for c in model.components()}
    assert counts["transformer"] == 11_901_408_320
    assert counts["text_encoder_2"] == 4_762_310_656
    assert counts["text_encoder"] == 123_060_480


@pytest.mark.parametrize("kind", ["int8", "float8"])
def test_8bit_base_counts_block_linears_at_one_byte(kind: str) -> None:
    """Written out: bf16 everywhere, minus one byte per weight of each Linear inside the blocks, plus a
    4-byte scale per output row."""
    path = "black-forest-labs/FLUX.1-dev"
    plain = FluxMemoryModel(flux_config("flux", path, training={"precision": "bf16"}), "cuda")
    config = flux_config("flux", path, training={"precision": "bf16"}, flux={"quantize_base": kind})
    quantized = FluxMemoryModel(config, "cuda")
    # 19 double blocks: 12 Linears (q k v out, add_q add_k add_v add_out, 2 ff in/out, 2 ff_context) + 2
    # norm1 modulations; 38 single blocks: q k v, proj_mlp, proj_out, norm.linear
    d, mlp = 3072, 4 * 3072
    double = 8 * ((d * d, d),) + 2 * ((d * mlp, mlp), (mlp * d, d)) + 2 * ((d * 6 * d, 6 * d),)
    single = 3 * ((d * d, d),) + ((d * mlp, mlp), ((d + mlp) * d, d), (d * 3 * d, 3 * d))
    weights = 19 * sum(w for w, _ in double) + 38 * sum(w for w, _ in single)
    rows = 19 * sum(r for _, r in double) + 38 * sum(r for _, r in single)
    before = {c.name: c.bytes for c in plain.components()}["transformer"]
    after = {c.name: c.bytes for c in quantized.components()}["transformer"]
    assert after == before - weights + rows * 4
    assert after < 0.6 * before


def real_tiny_model(family: str, config: TrainConfig):
    """The family's passes on the real demo modules (what demo://tiny-flux and tiny-klein hold) on the CPU."""
    model = TINY[family][1](config, "cpu")
    make = make_tiny_flux_pipeline if family == "flux" else make_tiny_klein_pipeline
    pipe = make(seed=0, pretrained=True)
    for name in model.parts:
        module = getattr(pipe, name)
        module.requires_grad_(False)
        module.eval()
        module.to(model.dtype)
        setattr(model, name, module)
    model.tensor_device = "cpu"
    return model


def measure_step(model, config: TrainConfig) -> tuple[int, int, int]:
    torch.manual_seed(0)
    params = [p for group in model.add_lora().values() for p in group.values()]
    return _training_step(model, config, params, DeviceEmulation("cpu", None))


@pytest.mark.parametrize("family", ["flux", "flux2"])
@pytest.mark.parametrize(
    "sections",
    [
        {},
        {"training": {"gradient_checkpointing": True}},
        {"dataset": {"shuffle_tags": True}, "training": {"batch_size": 1}},
    ],
    ids=["plain", "checkpointing", "text-each-step"],
)
def test_meta_measurement_equals_a_real_cpu_step(family: str, sections: dict) -> None:
    """fp32 on the CPU: the meta pass keeps and peaks at exactly what the real pass does."""
    config = flux_config(family, **sections)
    meta = measure_step(TINY[family][1](config, "cpu"), config)
    real = measure_step(real_tiny_model(family, config), config)
    assert real[2] > 50_000  # the step allocates something worth comparing
    assert meta == real


def test_flux1_text_encoder_lora_is_measured() -> None:
    config = flux_config("flux", lora={"train_text_encoder": True})
    model = FluxMemoryModel(config, "cpu")
    params = model.add_lora()
    assert set(params) == {"transformer", "text_encoder"}
    assert measure_step(real_tiny_model("flux", config), config) == measure_step(
        FluxMemoryModel(config, "cpu"), config
    )


def preset_cards() -> list[tuple[Path, int]]:
    found = [(path, int(re.search(r"(\d+)gb", path.stem).group(1))) for path in PRESETS.glob("flux*gb.toml")]
    return sorted(found, key=lambda item: item[1])


def test_every_flux_preset_is_checked() -> None:
    assert len(preset_cards()) == 6


@pytest.mark.timeout(900)
@pytest.mark.parametrize("preset, card_gb", preset_cards(), ids=lambda v: getattr(v, "stem", str(v)))
def test_every_flux_preset_fits_its_card_with_a_margin(preset: Path, card_gb: int) -> None:
    config = load_config(preset)
    est = estimate(config)
    assert est.architecture.startswith("the bundled flux")
    assert est.total <= 0.95 * card_gb * GIB, f"{preset.name}: {est.total / GIB:.2f} GiB"
    training = next(phase for phase in est.phases if phase.name == "training")
    transformer = next(p for p in training.parts if p.name == "base weights: transformer")
    assert training.total > transformer.bytes > 3.5 * GIB  # at least an 8-bit 4B base: not trivially small
