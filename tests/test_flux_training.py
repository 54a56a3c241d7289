"""End-to-end runs of the Flux families through the real trainer on the tiny demo models: the loss goes down,
resume equals uninterrupted, fused equals plain, exports load back, bad configs name the field."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.flux_helpers import demo_batch
from trainers import train as training
from trainers.checkpoint import list_checkpoints
from trainers.checks import check_config
from trainers.config import ConfigError, validate_config
from trainers.events import read_events
from trainers.models import adapter_for
from trainers.paths import resolve_model_path
from trainers.tiny_models import write_demo_dataset

FAMILIES = {"flux": "demo://tiny-flux", "flux2": "demo://tiny-klein"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module", autouse=True)
def _demo_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PPSF_DEMO_DIR", str(tmp_path_factory.mktemp("demo")))
        yield


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_demo_dataset(tmp_path / "data", num_images=6)


def make_config(tmp_path: Path, family: str, dataset_path: Path, **sections) -> dict:
    data = {
        "name": "run",
        "output_dir": str(tmp_path / "runs"),
        "model": {"family": family, "path": FAMILIES[family]},
        "dataset": {"path": str(dataset_path), "resolution": 64, "trigger_word": "shapes"},
        "lora": {"rank": 4, "alpha": 8},
        "training": {"max_steps": 20, "batch_size": 2, "precision": "fp32", "seed": 7},
        "optimizer": {"d0": 1e-4},
        "sampling": {"prompts": [], "steps": 2},
        "saving": {"every_n_steps": 0, "keep_last": 5, "formats": ["kohya", "diffusers"], "dtype": "fp32"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def run(tmp_path, family, dataset_path, **sections) -> Path:
    return training.train(validate_config(make_config(tmp_path, family, dataset_path, **sections)))


def step_losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in read_events(run_dir) if e["type"] == "step"]


def final_lora(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(run_dir)[-1][1] / "lora.safetensors")


def exported(run_dir: Path) -> tuple[Path, Path]:
    """(kohya/BFL file, diffusers file) of the run's last export."""
    done = [e for e in read_events(run_dir) if e["type"] == "done"][-1]
    files = [Path(f) for f in done["exported"]]
    return next(f for f in files if "diffusers" not in f.name), next(
        f for f in files if "diffusers" in f.name
    )


def fixed_noise_loss(adapter, latents, text) -> float:
    """The adapter's loss on the same noise and timesteps every call (generator seeded the same)."""
    with torch.no_grad():
        return float(adapter.training_loss(latents, text, [], torch.Generator().manual_seed(123)).mean())


def base_adapter(family: str, tmp_path: Path):
    config = validate_config(make_config(tmp_path, family, tmp_path))
    local = config.model.model_copy(update={"path": resolve_model_path(config.model.path)})
    adapter = adapter_for(family)(config.model_copy(update={"model": local}), torch.device("cpu"))
    adapter.load()
    return adapter


# ---------------------------------------------------------------- the run and its exports
@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_the_loss_and_every_export_loads(tmp_path, family, dataset) -> None:
    run_dir = run(tmp_path, family, dataset, training={"max_steps": 60})
    kohya_file, diffusers_file = exported(run_dir)

    adapter = base_adapter(family, tmp_path)
    latents, text = demo_batch(adapter, (0, 3))  # two of the training images (64 x 64)
    before = fixed_noise_loss(adapter, latents, text)
    adapter.pipe.load_lora_weights(str(diffusers_file.parent), weight_name=diffusers_file.name)
    after = fixed_noise_loss(adapter, latents, text)
    assert after < before * 0.97, (before, after)

    keys = load_file(kohya_file).keys()
    if family == "flux":
        # diffusers' kohya Flux.1 converter hard-codes 19/38 blocks, so the tiny file is checked by its names
        # (the fused qkv values are checked against the trained deltas in test_flux_export.py)
        assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.lora_down") for k in keys)
        assert any(k.startswith("lora_unet_single_blocks_0_linear1.lora_down") for k in keys)
    else:  # the BFL-named Klein file loads with load_lora_weights and gives the diffusers file's output
        assert all(k.startswith("diffusion_model.") for k in keys)
        other = base_adapter(family, tmp_path)
        other.pipe.load_lora_weights(str(kohya_file.parent), weight_name=kohya_file.name)
        assert fixed_noise_loss(other, latents, text) == pytest.approx(after, rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_equals_uninterrupted(tmp_path, family, dataset, monkeypatch) -> None:
    data = {"caption_dropout": 0.4}  # the Python RNG must be restored too
    straight = run(tmp_path / "a", family, dataset, dataset=data, training={"max_steps": 12})

    original = training.Trainer._log_step

    def stop_at_7(self, optimizer, state, *args):
        original(self, optimizer, state, *args)
        if state.step == 7:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: finish the step, checkpoint, stop

    monkeypatch.setattr(training.Trainer, "_log_step", stop_at_7)
    stopped = run(tmp_path / "b", family, dataset, dataset=data, training={"max_steps": 12})
    assert [e["type"] for e in read_events(stopped)][-2:] == ["checkpoint", "stopped"]
    assert [s for s, _ in list_checkpoints(stopped)] == [7]
    monkeypatch.undo()

    training.resume(stopped)
    assert step_losses(stopped) == step_losses(straight)
    a, b = final_lora(straight), final_lora(stopped)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_backward_equals_plain_step(tmp_path, family, dataset) -> None:
    fused = run(tmp_path / "a", family, dataset, optimizer={"fused_back_pass": True})
    plain = run(tmp_path / "b", family, dataset, optimizer={"fused_back_pass": False})
    assert step_losses(fused) == pytest.approx(step_losses(plain), rel=1e-4)
    a, b = final_lora(fused), final_lora(plain)
    scale = max(float(t.abs().max()) for t in b.values())
    for key in a:  # summation order differs, as in the SDXL test
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-2 * scale)


def test_export_metadata_is_the_familys(tmp_path, dataset) -> None:
    from trainers.export import read_lora_metadata

    run_dir = run(tmp_path, "flux2", dataset, training={"max_steps": 2})
    kohya_file, diffusers_file = exported(run_dir)
    for file in (kohya_file, diffusers_file):
        metadata = read_lora_metadata(file)
        assert metadata["ss_base_model_version"].startswith("flux2_klein"), metadata
        assert metadata["ss_network_dim"] == "4" and metadata["ss_steps"] == "2"


# ---------------------------------------------------------------- config errors name the field
def _problems(tmp_path: Path, family: str, **sections) -> str:
    with pytest.raises(ConfigError) as error:
        validate_config(make_config(tmp_path, family, tmp_path, **sections))
    return str(error.value)


@pytest.mark.parametrize(
    ("family", "sections", "field"),
    [
        ("flux", {"flux": {"variant": "schnell", "guidance": 1.0}}, "guidance"),
        ("flux2", {"flux": {"guidance": 1.0}}, "flux.guidance"),
        ("flux", {"flux": {"lora_targets": "attn"}}, "flux.lora_targets"),
        ("flux", {"flux": {"variant": "klein"}}, "flux.variant"),
        ("flux2", {"flux": {"variant": "dev"}}, "flux.variant"),
        ("flux", {"flux": {"quantize_base": "int4"}}, "flux.quantize_base"),
        ("flux", {"lora": {"target_modules": ["to_q"]}}, "lora.target_modules"),
        ("flux", {"training": {"min_snr_gamma": 5.0}}, "training.min_snr_gamma"),
        ("flux", {"training": {"noise_offset": 0.05}}, "training.noise_offset"),
        ("flux", {"model": {"prediction_type": "epsilon"}}, "model.prediction_type"),
        ("flux2", {"lora": {"train_text_encoder": True}}, "lora.train_text_encoder"),
        ("sdxl", {"flux": {"timestep_sampling": "uniform"}}, "flux"),
    ],
)
def test_bad_combinations_name_the_field(tmp_path, family, sections, field) -> None:
    if family == "sdxl":
        sections = {"model": {"family": "sdxl", "path": str(tmp_path)}, **sections}
        family = "flux"
        data = make_config(tmp_path, family, tmp_path, **sections)
        with pytest.raises(ConfigError) as error:
            validate_config(data)
        message = str(error.value)
    else:
        message = _problems(tmp_path, family, **sections)
    assert f"{field}:" in message or f"{field} " in message, message


def test_an_sdxl_config_saved_with_flux_defaults_still_loads(tmp_path) -> None:
    from trainers.config import dump_config, resolved_config

    data = make_config(tmp_path, "flux", tmp_path, model={"family": "sdxl", "path": "demo://tiny-sdxl"})
    config = resolved_config(validate_config(data))
    assert "[flux]" in dump_config(config)  # the defaults are written out, and read back as no section
    assert validate_config(config.model_dump(mode="json", exclude_none=True)).model.family == "sdxl"


def test_unknown_raw_target_is_named_before_loading(tmp_path, dataset) -> None:
    problems, _ = check_config(
        validate_config(make_config(tmp_path, "flux", dataset, flux={"lora_targets": ["to_qq"]}))
    )
    assert any(p.startswith("flux.lora_targets: 'to_qq' matches no layer") for p in problems), problems


def test_quantisation_the_machine_cannot_run_is_named_before_loading(tmp_path, dataset, monkeypatch) -> None:
    from trainers.models import flow_matching

    loads = []
    monkeypatch.setattr(flow_matching.FlowMatchingAdapter, "load", lambda self: loads.append(self))
    monkeypatch.setitem(__import__("sys").modules, "torchao", None)  # as if torchao were not installed
    with pytest.raises(ValueError, match=r"flux\.quantize_base = 'int8' needs torchao"):
        run(tmp_path, "flux", dataset, flux={"quantize_base": "int8"})
    assert not loads


def test_int8_base_trains_through_the_config(tmp_path, dataset) -> None:
    pytest.importorskip("torchao", reason="torchao is not installed (not in requirements.txt)")
    plain = run(tmp_path / "a", "flux", dataset, training={"max_steps": 10})
    int8 = run(tmp_path / "b", "flux", dataset, training={"max_steps": 10}, flux={"quantize_base": "int8"})
    assert step_losses(int8) == pytest.approx(step_losses(plain), rel=0.05)
