"""The memory estimate (trainers/memory): meta-device measurements against real CPU runs of the same tiny
model, optimizer bytes against a real ProdigyPlusScheduleFree, the bundled SDXL configs against SDXL's
published parameter counts, every SDXL preset against its card, and the check command's output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ppsf_optim import ProdigyPlusScheduleFree
from trainers.__main__ import main
from trainers.config import TrainConfig, load_config, validate_config
from trainers.memory import estimate, suggestions
from trainers.memory.estimate import GIB
from trainers.memory.measure import DeviceEmulation, LiveTensors, saved_for_backward
from trainers.memory.measurements import _training_step
from trainers.memory.optimizer_state import optimizer_bytes
from trainers.models.sdxl_memory import SDXLMemoryModel
from trainers.tiny_models import make_tiny_sdxl_pipeline

PRESETS = Path(__file__).resolve().parent.parent / "presets"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PPSF_MEMORY_CACHE", str(tmp_path / "memory-cache"))
    monkeypatch.setenv("PPSF_DEMO_DIR", str(tmp_path / "demo"))


def tiny_config(**sections) -> TrainConfig:
    data = {
        "name": "t",
        "model": {"path": "demo://tiny-sdxl"},
        "dataset": {"path": "demo://shapes", "resolution": 128},
        "lora": {"rank": 4},
        "training": {"max_steps": 1, "batch_size": 2, "precision": "fp32"},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return validate_config(data)


def real_tiny_model(config: TrainConfig) -> SDXLMemoryModel:
    """The family's passes on the real demo architecture (demo://tiny-sdxl, random weights) on the CPU."""
    model = SDXLMemoryModel(config, "cpu")
    pipe = make_tiny_sdxl_pipeline(seed=0, demo_architecture=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        module.requires_grad_(False)
        module.eval()
        if name != "vae":
            module.to(model.dtype)
        setattr(model, name, module)
    model.tensor_device = "cpu"
    return model


def measure_step(model: SDXLMemoryModel, config: TrainConfig, emulation) -> tuple[int, int, int]:
    torch.manual_seed(0)
    params = [p for group in model.add_lora().values() for p in group.values()]
    return _training_step(model, config, params, emulation)


@pytest.mark.parametrize(
    "training",
    [{}, {"gradient_checkpointing": True}, {"batch_size": 1}],
    ids=["plain", "checkpointing", "batch1"],
)
def test_meta_measurement_equals_a_real_cpu_step(training: dict) -> None:
    """fp32 on the CPU: the meta pass keeps and peaks at exactly what the real pass does."""
    config = tiny_config(training=training)
    meta = measure_step(SDXLMemoryModel(config, "cpu"), config, DeviceEmulation("cpu", None))
    real = measure_step(real_tiny_model(config), config, DeviceEmulation("cpu", None))
    assert real[2] > 100_000  # the step allocates something worth comparing
    assert meta == real


def test_autocast_emulation_matches_real_cpu_autocast() -> None:
    """bf16: the meta pass with the emulated CPU autocast policy against torch.autocast on real tensors."""
    config = tiny_config(training={"precision": "bf16"})
    meta = measure_step(SDXLMemoryModel(config, "cpu"), config, DeviceEmulation("cpu", torch.bfloat16))
    real = measure_step(real_tiny_model(config), config, torch.autocast("cpu", dtype=torch.bfloat16))
    for measured, reference in zip(meta[1:], real[1:]):
        assert measured == pytest.approx(reference, rel=0.05)


def test_saved_tensor_hooks_count_what_the_graph_keeps() -> None:
    """Without checkpointing, what autograd saves is what stays alive after the forward pass (minus the
    loss itself): two independent counts of the same activations."""
    config = tiny_config()
    model = real_tiny_model(config)
    model.add_lora()
    tracker = LiveTensors()
    with DeviceEmulation("cpu", None), tracker:
        with saved_for_backward(tracker) as saved:
            loss = model.training_loss(2, 128, 128)
        alive = tracker.current
    assert sum(saved.values()) == pytest.approx(alive, rel=0.02)
    assert sum(saved.values()) > 100_000
    del loss


def test_a_saved_tensor_freed_before_backward_is_not_counted() -> None:
    """A branch of the graph that the loss does not use frees what it saved: not an activation, whatever
    address the allocator gives the next storage."""
    weight = torch.ones(256, requires_grad=True)  # existed before: a weight, not counted
    tracker = LiveTensors()
    with tracker, saved_for_backward(tracker) as saved:
        loss = (weight * 3).sin().sum()  # sin saves its input: 1 KiB, kept for backward
        unused = (weight * 2).cos()  # saves 1 KiB more, freed with the branch
        del unused
    assert sum(saved.values()) == 256 * 4
    del loss


def test_live_tensor_count_agrees_with_the_cpu_allocator() -> None:
    """LiveTensors' peak against the CPU allocator's own records (torch.profiler's memory profile: each
    op's own allocations minus frees, in time order, so transients inside one op are not seen)."""
    config = tiny_config()
    model = real_tiny_model(config)
    params = [p for group in model.add_lora().values() for p in group.values()]
    _, _, peak = _training_step(model, config, params, DeviceEmulation("cpu", None))
    for p in params:
        p.grad = None
    assert peak == pytest.approx(
        allocator_peak(lambda: _training_step(model, config, params, DeviceEmulation("cpu", None))), rel=0.05
    )


def allocator_peak(run) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "step"])
@pytest.mark.parametrize("factored", [True, False], ids=["factored", "full"])
def test_optimizer_bytes_equal_a_real_optimizer_after_one_step(fused: bool, factored: bool) -> None:
    config = tiny_config(optimizer={"fused_back_pass": fused, "factored": factored})
    model = real_tiny_model(config)
    named = {n: p for group in model.add_lora().values() for n, p in group.items()}
    params = list(named.values())
    kwargs = config.optimizer.optimizer_kwargs() | {"fused_back_pass": False, "prodigy_steps": 0}
    tracker = LiveTensors()
    with tracker:
        optimizer = ProdigyPlusScheduleFree([{"params": params}], **kwargs)
        if fused:
            optimizer.attach_fused_backward()
        model.training_loss(2, 64, 64).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        held = tracker.current
    report = optimizer.telemetry()[0]
    assert report["step"] == 1 and report["nonfinite_skips"] == 0  # the step really happened
    expected = optimizer_bytes(params, config.optimizer, ["lora_B" in n for n in named])
    assert expected.total == held
    assert expected.state == report["state_bytes"]  # the optimizer's own count of its per-parameter state


def test_bundled_sdxl_configs_give_the_published_parameter_counts() -> None:
    config = tiny_config(model={"path": "stabilityai/stable-diffusion-xl-base-1.0"})
    model = SDXLMemoryModel(config, "cuda")
    counts = {c.name: c.params for c in model.components()}
    # stabilityai/stable-diffusion-xl-base-1.0: UNet 2.567 B, CLIP ViT-L 123 M, OpenCLIP bigG 695 M, VAE 84 M
    assert counts == {
        "unet": 2_567_463_684,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
        "vae": 83_653_863,
    }
    assert "bundled" in model.architecture_source


def test_phases_follow_the_trainers_order() -> None:
    """Encoders share the device with the denoiser only when a training step needs them."""
    cached = estimate(tiny_config())
    names = {phase.name: {p.name for p in phase.parts} for phase in cached.phases}
    assert "base weights: unet" not in names["load and fill caches"]
    assert "base weights: vae" not in names["training"]
    assert "base weights: text_encoder" not in names["training"]
    assert "sampling" not in names  # no prompts, no sampling phase

    uncached = estimate(tiny_config(dataset={"cache_latents": False, "shuffle_tags": True}))
    training = {p.name for p in uncached.phases[1].parts}
    assert {"base weights: vae", "base weights: text_encoder", "base weights: text_encoder_2"} <= training

    on_cpu = estimate(tiny_config(sampling={"prompts": ["a"]}), device_type="cpu")
    assert [p.name for p in on_cpu.phases] == ["load and fill caches", "training", "sampling"]
    assert "base weights: unet" in {p.name for p in on_cpu.phases[0].parts}  # nothing moves on a CPU
    assert on_cpu.total == on_cpu.measured_peak  # no CUDA allowances


def test_samples_bring_only_the_vae_unless_the_text_encoders_train() -> None:
    """Sample prompts are encoded while the caches fill (prepare_samples): frozen text encoders stay off
    the device while sampling; trained ones are on it anyway and re-encode the prompts."""
    sampled = estimate(tiny_config(sampling={"prompts": ["a"]}))
    sampling = {p.name: p for p in sampled.phases[2].parts}
    assert "base weights: unet" in sampling and "base weights: vae" in sampling
    assert not [name for name in sampling if name.startswith("base weights: text_encoder")]
    measured = estimate_measurements(tiny_config(sampling={"prompts": ["a"]}))
    assert sampling["workspace: sampling"].bytes == max(measured["sample_step"], measured["decode"])
    caching = {p.name: p.bytes for p in sampled.phases[0].parts}  # the prompts are encoded there
    assert caching["workspace: encoding"] >= measured["encode_captions"]

    trained = estimate(tiny_config(sampling={"prompts": ["a"]}, lora={"train_text_encoder": True}))
    sampling = {p.name for p in trained.phases[2].parts}
    assert {"base weights: text_encoder", "base weights: text_encoder_2"} <= sampling


def estimate_measurements(config: TrainConfig) -> dict:
    from trainers.memory.estimate import _measure, architecture_of

    return _measure(config, "cuda", architecture_of(config))


def test_gradient_checkpointing_and_batch_lower_the_estimate() -> None:
    base = estimate(tiny_config(training={"batch_size": 4})).phases[1].total
    checkpointed = estimate(tiny_config(training={"batch_size": 4, "gradient_checkpointing": True}))
    assert checkpointed.phases[1].total < base
    assert estimate(tiny_config(training={"batch_size": 1})).phases[1].total < base


def test_suggestions_name_changes_that_fit() -> None:
    config = tiny_config(dataset={"resolution": 256}, training={"batch_size": 4})
    full = estimate(config, "cpu").total
    checkpointed = tiny_config(
        dataset={"resolution": 256}, training={"batch_size": 4, "gradient_checkpointing": True}
    )
    card = (estimate(checkpointed, "cpu").total + full) // 2
    found = suggestions(config, card, "cpu")
    assert found and found[0].change == "--set training.gradient_checkpointing=true"
    assert found[0].total == estimate(checkpointed, "cpu").total <= card
    assert all(s.total <= card for s in found)


def preset_cards() -> list[tuple[Path, int]]:
    found = [(path, int(re.search(r"(\d+)gb", path.stem).group(1))) for path in PRESETS.glob("sdxl_*gb.toml")]
    return sorted(found, key=lambda item: item[1])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("preset, card_gb", preset_cards(), ids=lambda v: getattr(v, "stem", str(v)))
def test_every_sdxl_preset_fits_its_card_with_a_margin(preset: Path, card_gb: int) -> None:
    est = estimate(load_config(preset))
    assert est.architecture.startswith("the bundled SDXL base 1.0 configs")
    assert est.total <= 0.95 * card_gb * GIB, f"{preset.name}: {est.total / GIB:.2f} GiB"
    training = est.phases[1]
    assert training.total > 4.7 * GIB  # at least the bf16 UNet: the estimate is not trivially small


def test_check_prints_the_estimate_when_the_dataset_is_missing(tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        'name = "x"\n[model]\npath = "demo://tiny-sdxl"\n[dataset]\npath = "no/such/folder"\n'
        "resolution = 64\n[training]\nmax_steps = 1\n"
    )
    assert main(["check", str(config), "--vram", "8"]) == 2
    out, err = capsys.readouterr()
    assert "memory estimate on the cuda device" in out
    assert "fits a 8 GB card" in out
    assert "dataset.path" in err and "does not exist" in err


def test_check_verdict_for_a_card_too_small(tmp_path: Path, capsys) -> None:
    """The CUDA context allowance alone exceeds 0.25 GB: no config change can make it fit."""
    config = tmp_path / "c.toml"
    config.write_text(
        'name = "x"\n[model]\npath = "demo://tiny-sdxl"\n[dataset]\npath = "demo://shapes"\n'
        "resolution = 64\n[training]\nmax_steps = 1\n"
    )
    assert main(["check", str(config), "--vram", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit a 0.25 GB card" in out
    assert "no change this trainer offers makes it fit" in out


def test_estimate_summary_is_markdown_with_the_verdict() -> None:
    from trainers.memory import estimate_summary

    text = estimate_summary(tiny_config(), vram_gib=8)
    assert text.startswith("**Estimated peak: ")
    assert "| part | memory |" in text and "| gradients |" in text
    assert "fits a 8 GB card" in text
    assert "not yet checked against a real GPU" in text


# ------------------------------------------------------------------ caches and the bundled measurements
REPO = Path(__file__).resolve().parent.parent
MODEL_LIBRARIES = ("diffusers", "transformers", "peft")
ESTIMATE_IN_A_FRESH_PROCESS = """
import dataclasses, json, sys
from trainers.config import validate_config
from trainers.memory import estimate
est = estimate(validate_config(json.loads(sys.argv[1])))
imported = [name for name in sys.argv[2:] if name in sys.modules]
print(json.dumps({"estimate": dataclasses.asdict(est), "imported": imported}))
"""


def estimate_in_a_fresh_process(config: TrainConfig) -> dict:
    """The estimate of `config` by a new Python process (the disk cache is the test's, see _isolated),
    and which of the model libraries it imported."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", ESTIMATE_IN_A_FRESH_PROCESS, config.model_dump_json(), *MODEL_LIBRARIES],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_cached_estimate_builds_no_model_and_equals_the_measured_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once measured, an estimate is read from the disk cache: no model library is imported (so no model
    is built), and it is the estimate the measurement gave."""
    import dataclasses
    import importlib

    estimate_module = importlib.import_module("trainers.memory.estimate")  # the package exports the function
    monkeypatch.setattr(estimate_module, "_MEMORY_CACHE", {})  # measured here, into this test's disk cache
    config = tiny_config(sampling={"prompts": ["a"]}, training={"gradient_checkpointing": True})
    measured = estimate(config)
    warm = estimate_in_a_fresh_process(config)
    assert warm["imported"] == []
    assert warm["estimate"] == json.loads(json.dumps(dataclasses.asdict(measured)))


def test_the_cache_key_follows_the_architecture_not_the_model_path(tmp_path: Path) -> None:
    """A diffusers folder with the demo model's configs is the same architecture: the measurement is
    shared; a changed field that shapes the model is a different one."""
    from trainers.memory.estimate import architecture_of, measurement_keys
    from trainers.tiny_models import CLIP_CONFIG, DEMO_UNET_CONFIG, VAE_CONFIG

    folder = tmp_path / "tiny-sdxl"
    configs = {
        "unet": DEMO_UNET_CONFIG,
        "vae": VAE_CONFIG,
        "text_encoder": CLIP_CONFIG,
        "text_encoder_2": CLIP_CONFIG,
    }
    for part, values in configs.items():
        (folder / part).mkdir(parents=True)
        saved = {"_name_or_path": str(folder), "_diffusers_version": "0.0", **values}
        (folder / part / "config.json").write_text(json.dumps(saved))
    (folder / "model_index.json").write_text("{}")

    def keys(config: TrainConfig) -> list[str]:
        return measurement_keys(config, "cuda", architecture_of(config)[0])

    demo, local = tiny_config(), tiny_config(model={"path": str(folder)})
    assert architecture_of(local)[1] != architecture_of(demo)[1]
    assert keys(local) == keys(demo)
    wider = json.loads((folder / "unet" / "config.json").read_text())
    wider["block_out_channels"] = [64, 64]
    (folder / "unet" / "config.json").write_text(json.dumps(wider))
    assert all(a != b for a, b in zip(keys(local), keys(demo)))
    assert keys(tiny_config(model={"prediction_type": "epsilon"})) == keys(demo)  # not measured


def test_the_bundled_measurements_cover_every_sdxl_preset() -> None:
    """`check presets/sdxl_*.toml` measures nothing (and imports no model library) on a new machine."""
    from trainers.memory.estimate import architecture_of, bundled_measurements, measurement_keys

    for preset, _ in preset_cards():
        config = load_config(preset)
        missing = set(measurement_keys(config, "cuda", architecture_of(config)[0])) - set(
            bundled_measurements()
        )
        assert not missing, (
            f"{preset.name}: trainers/memory/bundled_measurements.json is stale (the measuring code, a "
            "library or the preset changed); run `HF_HUB_OFFLINE=1 python bench/memory.py --write-bundled`"
        )
    fresh = estimate_in_a_fresh_process(load_config(PRESETS / "sdxl_24gb.toml"))  # an empty disk cache
    assert fresh["imported"] == []


@pytest.mark.timeout(900)
def test_a_bundled_measurement_equals_a_fresh_one() -> None:
    """The 8 GB preset's training step (LoRA, optimizer state, checkpointed activations) measured again."""
    from trainers.memory.estimate import architecture_of, bundled_measurements, measure, measurement_keys

    config = load_config(PRESETS / "sdxl_8gb.toml")
    architecture = architecture_of(config)
    keys = [k for k in measurement_keys(config, "cuda", architecture[0]) if '"kind": "training"' in k]
    assert len(keys) == 1
    assert measure(keys[0], architecture) == bundled_measurements()[keys[0]]
