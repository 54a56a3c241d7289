"""Validation at the exported weights x: fixed noise and timesteps, no effect on training, exact after resume,
the written-out objective, every family, and `export --best`."""

from __future__ import annotations

import json
import math
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from run_helpers import config_builder

from trainers import train as training
from trainers.__main__ import main as cli
from trainers.cache import file_digest, latent_key
from trainers.checkpoint import list_checkpoints
from trainers.config import ConfigError, FluxTrainingOptions, validate_config
from trainers.dataset import DatasetError, ImageItem, assign_buckets, load_image, scan_dataset
from trainers.events import read_events
from trainers.models.flow_matching import quantile_base_sigmas, sample_base_sigmas
from trainers.tiny_models import write_demo_dataset
from trainers.validation import NOISE_SEED, split_dataset, timestep_quantiles

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def validation_folder(tmp_path) -> Path:
    return write_demo_dataset(tmp_path / "validation", num_images=3, seed=1)


make_config = config_builder()


def run(tmp_path, model_path, dataset_path, **sections) -> Path:
    return training.train(validate_config(make_config(tmp_path, model_path, dataset_path, **sections)))


def events_of(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_events(run_dir) if e["type"] == kind]


def validated(folder: Path, every: int = 4, timesteps: int = 2) -> dict:
    return {
        "dataset": {"validation": str(folder)},
        "validation": {"every_n_steps": every, "timesteps": timesteps},
    }


# ---------------------------------------------------------------- determinism
def test_validation_changes_no_training_and_resume_repeats_it(
    tmp_path, tiny_model, dataset, validation_folder, monkeypatch
) -> None:
    plain = run(tmp_path / "plain", tiny_model, dataset)
    straight = run(tmp_path / "straight", tiny_model, dataset, **validated(validation_folder))

    # the run with validation trains exactly as the one without: same losses, same final weights
    assert [e["loss"] for e in events_of(straight, "step")] == [e["loss"] for e in events_of(plain, "step")]
    a, b = (list_checkpoints(r)[-1][1] / "lora.safetensors" for r in (plain, straight))
    from safetensors.torch import load_file

    for key, value in load_file(a).items():
        assert torch.equal(value, load_file(b)[key]), key

    results = events_of(straight, "validation")
    assert [e["step"] for e in results] == [4, 8, 12]
    assert all(math.isfinite(e["loss"]) and e["images"] == 3 and e["timesteps"] == 2 for e in results)
    best = min(results, key=lambda e: e["loss"])
    assert (results[-1]["best_step"], results[-1]["best_loss"]) == (best["step"], best["loss"])

    # stopped at step 6 (checkpoint there), then resumed: the same validation values, bit for bit
    original = training.Trainer._log_step

    def stop_at_6(self, optimizer, state, *args):
        original(self, optimizer, state, *args)
        if state.step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(training.Trainer, "_log_step", stop_at_6)
    resumed = run(tmp_path / "resumed", tiny_model, dataset, **validated(validation_folder))
    monkeypatch.undo()
    assert [e["step"] for e in events_of(resumed, "validation")] == [4]
    training.resume(resumed)
    assert events_of(resumed, "validation") == [
        {**e, "seconds": r["seconds"], "time": r["time"]}
        for e, r in zip(results, events_of(resumed, "validation"))
    ]


def test_text_encoder_training_validates_without_changing_training(
    tmp_path, tiny_model, dataset, validation_folder
) -> None:
    # the captions are encoded at each evaluation with the text encoders' eval-mode LoRA
    lora = {"rank": 4, "alpha": 8, "train_text_encoder": True, "dropout": 0.1}
    common = {"lora": lora, "training": {"max_steps": 6}}
    plain = run(tmp_path / "plain", tiny_model, dataset, **common)
    checked = run(
        tmp_path / "checked", tiny_model, dataset, **common, **validated(validation_folder, every=2)
    )
    assert [e["loss"] for e in events_of(checked, "step")] == [e["loss"] for e in events_of(plain, "step")]
    assert [e["step"] for e in events_of(checked, "validation")] == [2, 4, 6]


def test_the_same_weights_give_the_same_value_twice(
    tmp_path, tiny_model, dataset, validation_folder, monkeypatch
):
    from trainers.validation import Validator

    seen = []
    original = Validator.evaluate

    def twice(self, adapter, optimizer, step):
        first = original(self, adapter, optimizer, step)
        second = original(self, adapter, optimizer, step)
        seen.append((first["loss"], second["loss"]))
        return second

    monkeypatch.setattr(Validator, "evaluate", twice)
    run(tmp_path, tiny_model, dataset, training={"max_steps": 4}, **validated(validation_folder, every=2))
    assert len(seen) == 2 and all(first == second for first, second in seen)
    assert seen[0][0] != seen[1][0], "the weights changed between steps 2 and 4, so should the loss"


# ---------------------------------------------------------------- the objective, written out
def test_validation_loss_is_the_written_out_objective_at_the_exported_weights(
    tmp_path, tiny_model, dataset, validation_folder
) -> None:
    from diffusers import StableDiffusionXLPipeline

    run_dir = run(tmp_path, tiny_model, dataset, **validated(validation_folder, every=0, timesteps=3))
    (result,) = events_of(run_dir, "validation")
    exported = events_of(run_dir, "done")[0]["exported"][0]

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model, local_files_only=True)
    pipe.load_lora_weights(exported)  # the eval-mode average x, as written by export
    items = sorted(scan_dataset(validation_folder).items, key=lambda item: str(item.path))
    buckets = assign_buckets(items, 64, 2.0, True)
    alphas = pipe.scheduler.alphas_cumprod
    losses = []
    for i, (item, bucket) in enumerate(zip(items, buckets)):
        rng = random.Random(latent_key(file_digest(item.path), bucket, "center"))
        loaded = load_image(item.path, bucket, "center", rng)
        generator = torch.Generator().manual_seed(rng.getrandbits(63))
        with torch.no_grad():
            x0 = pipe.vae.encode(loaded.pixels[None]).latent_dist.sample(generator) * 0.13025
            embeds, _, pooled, _ = pipe.encode_prompt(
                f"shapes, {item.caption}", device="cpu", do_classifier_free_guidance=False
            )
        time_ids = torch.tensor([[*loaded.original_size, *loaded.crop_top_left, *loaded.target_size]]).float()
        for j in range(3):
            t = int((j + (i + 0.5) / 3) / 3 * 1000)  # quantile (j + (i + 1/2) / N) / K of U{0..999}
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(NOISE_SEED + 1000 * i + j))
            noisy = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * noise
            with torch.no_grad():
                prediction = pipe.unet(
                    noisy,
                    torch.tensor([t]),
                    encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                ).sample
            losses.append(((prediction - noise) ** 2).mean().item())
    assert result["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_timesteps_cover_the_schedule_evenly() -> None:
    quantiles = sorted(q for row in timestep_quantiles(3, 4) for q in row)
    assert quantiles == pytest.approx([(k + 0.5) / 12 for k in range(12)])


@pytest.mark.parametrize(
    "options",
    [
        {"timestep_sampling": "uniform"},
        {"timestep_sampling": "sigmoid", "sigmoid_scale": 1.5},
        {"timestep_sampling": "logit_normal", "logit_mean": 0.3, "logit_std": 0.8},
    ],
)
def test_flow_matching_quantiles_are_those_of_the_training_distribution(options) -> None:
    flux = FluxTrainingOptions(**options)
    drawn = sample_base_sigmas(flux, 400_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    levels = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    assert quantile_base_sigmas(flux, levels) == pytest.approx(torch.quantile(drawn, levels), abs=3e-3)


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_flow_matching_families_validate(tmp_path, family, monkeypatch) -> None:
    monkeypatch.setenv("PPSF_DEMO_DIR", str(tmp_path / "demo"))
    data = {
        "name": family,
        "output_dir": str(tmp_path / "runs"),
        "model": {"family": family, "path": "demo://tiny-flux" if family == "flux" else "demo://tiny-klein"},
        "dataset": {"path": "demo://shapes", "resolution": 64, "trigger_word": "shapes", "validation": 0.25},
        "lora": {"rank": 4, "alpha": 4},
        "training": {"max_steps": 4, "batch_size": 2, "precision": "fp32"},
        "optimizer": {"d0": 1e-4},
        "validation": {"every_n_steps": 2, "timesteps": 2},
        "saving": {"every_n_steps": 0, "formats": ["diffusers"], "dtype": "fp32"},
    }
    run_dir = training.train(validate_config(data))
    results = events_of(run_dir, "validation")
    assert [e["step"] for e in results] == [2, 4] and results[0]["images"] == 3
    assert all(math.isfinite(e["loss"]) for e in results)
    assert (
        events_of(run_dir, "dataset")[0]["images"] == 9 and events_of(run_dir, "dataset")[0]["held_out"] == 3
    )


# ---------------------------------------------------------------- the held-out fraction and the config
def _items(count: int) -> list[ImageItem]:
    return [ImageItem(Path(f"/d/{i:02d}.png"), f"c{i}", 1, 64, 64) for i in range(count)]


def test_a_fraction_holds_out_the_same_images_whatever_the_order() -> None:
    config = validate_config(
        {
            "name": "r",
            "model": {"path": "m"},
            "dataset": {"path": "d", "validation": 0.2},
            "training": {"max_steps": 1},
        }
    )
    items = _items(20)
    train_items, held = split_dataset(config.dataset, items)
    assert len(held) == 4 and len(train_items) == 16 and not set(map(id, held)) & set(map(id, train_items))
    shuffled = items[::-1]
    assert {i.path for i in split_dataset(config.dataset, shuffled)[1]} == {i.path for i in held}
    with pytest.raises(DatasetError, match="dataset.validation"):
        split_dataset(config.dataset, _items(2))


def test_config_and_check_name_the_validation_fields(tmp_path, tiny_model, dataset, capsys) -> None:
    with pytest.raises(ConfigError, match="dataset.validation"):
        validate_config(make_config(tmp_path, tiny_model, dataset, dataset={"validation": 1.5}))
    config = tmp_path / "c.toml"
    import tomli_w

    for sections, expected in [
        ({"validation": {"every_n_steps": 5}}, "validation.every_n_steps: there are no validation images"),
        ({"dataset": {"validation": str(tmp_path / "nope")}}, "dataset.validation:"),
        ({"dataset": {"validation": str(dataset)}}, "is the training folder itself"),
    ]:
        config.write_text(tomli_w.dumps(make_config(tmp_path, tiny_model, dataset, **sections)))
        assert cli(["check", str(config)]) == 2
        assert expected in capsys.readouterr().err
    config.write_text(tomli_w.dumps(make_config(tmp_path, tiny_model, dataset, dataset={"validation": 0.95})))
    assert cli(["check", str(config)]) == 2
    assert (
        "dataset.validation: holding out 0.95 of 6 images leaves nothing to train on"
        in capsys.readouterr().err
    )
    config.write_text(tomli_w.dumps(make_config(tmp_path, tiny_model, dataset, dataset={"validation": 0.3})))
    assert cli(["check", str(config)]) == 0
    assert "validation: 2 of the 6 images held out (not trained on)" in capsys.readouterr().out


# ---------------------------------------------------------------- export --best
def test_export_best_picks_the_checkpoint_of_the_best_step(
    tmp_path, tiny_model, dataset, validation_folder, capsys
) -> None:
    run_dir = run(
        tmp_path, tiny_model, dataset, saving={"every_n_steps": 4}, **validated(validation_folder, every=4)
    )
    best = min(events_of(run_dir, "validation"), key=lambda e: e["loss"])["step"]
    capsys.readouterr()  # the training run's output
    assert cli(["export", str(run_dir), "--best"]) == 0
    lines = capsys.readouterr().out.splitlines()
    written = [Path(line.split()[0]) for line in lines if line.strip().endswith("format)")]
    assert written and all(path.name.startswith(f"run-step{best:06d}-") for path in written)


def test_pruning_keeps_the_best_steps_checkpoint(
    tmp_path, tiny_model, dataset, validation_folder, monkeypatch, capsys
) -> None:
    """keep_last = 1 keeps the newest checkpoint and the best validation step's, so `export --best` works;
    the other steps are pruned."""
    losses = iter([0.5, 0.1, 0.3, 0.4, 0.2, 0.6])  # steps 2, 4, ..., 12: the best is step 4
    monkeypatch.setattr("trainers.validation.Validator._mean_loss", lambda self, adapter: next(losses))
    run_dir = run(
        tmp_path,
        tiny_model,
        dataset,
        saving={"every_n_steps": 2, "keep_last": 1},
        **validated(validation_folder, every=2),
    )
    assert [e["best_step"] for e in events_of(run_dir, "validation")][-1] == 4
    assert [step for step, _ in list_checkpoints(run_dir)] == [4, 12]
    capsys.readouterr()
    assert cli(["export", str(run_dir), "--best"]) == 0
    assert "run-step000004-" in capsys.readouterr().out


def test_export_best_says_when_the_best_checkpoint_was_not_kept(
    tmp_path, tiny_model, dataset, capsys
) -> None:
    import tomli_w

    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "config.toml").write_text(
        tomli_w.dumps(make_config(tmp_path, tiny_model, dataset, validation={"every_n_steps": 50}))
    )
    lines = [
        {"type": "validation", "step": s, "loss": loss} for s, loss in [(50, 0.3), (100, 0.2), (150, 0.25)]
    ]
    (run_dir / "events.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli(["export", str(run_dir), "--best"]) == 2
    error = capsys.readouterr().err
    assert "best validation loss (0.2) was at step 100" in error and "saving.every_n_steps = 50" in error

    (run_dir / "events.jsonl").write_text("")
    assert cli(["export", str(run_dir), "--best"]) == 2
    assert "no validation results" in capsys.readouterr().err


def test_the_demo_validation_set_is_the_concept_never_trained_on(tmp_path, monkeypatch) -> None:
    """demo://shapes-validation: 4 images of the demo's concept, none of them one of the 12 trained on."""
    from trainers.checks import _validation_problems
    from trainers.config import validate_config
    from trainers.paths import resolve_dataset_path

    monkeypatch.setenv("PPSF_DEMO_DIR", str(tmp_path))
    trained = {p.read_bytes() for p in resolve_dataset_path("demo://shapes").rglob("*.png")}
    held = [p.read_bytes() for p in resolve_dataset_path("demo://shapes-validation").rglob("*.png")]
    assert len(trained) == 12 and len(held) == 4 and not trained & set(held)

    def problems(validation: str) -> list[str]:
        config = validate_config(
            {
                "name": "demo",
                "model": {"path": "demo://tiny-sdxl"},
                "dataset": {"path": "demo://shapes", "validation": validation},
                "training": {"max_steps": 10},
            }
        )
        return _validation_problems(config)

    assert problems("demo://shapes-validation") == []
    assert "is not a demo validation set" in problems("demo://shapes")[0]  # the training images themselves
    assert "demo://shapes-validation" in problems("demo://nope")[0]
