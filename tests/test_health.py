"""d-health warnings: each one forced, each written and printed once, none on a healthy run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ppsf_optim import ProdigyPlusScheduleFree
from trainers import train as training
from trainers.config import validate_config
from trainers.events import read_events
from trainers.health import CODES, HealthMonitor
from trainers.tiny_models import write_demo_dataset


class Events:
    def __init__(self) -> None:
        self.written: list[dict] = []

    def write(self, event_type: str, **fields) -> None:
        self.written.append({"type": event_type, **fields})

    def codes(self) -> list[str]:
        return [e["code"] for e in self.written]


class FakeOptimizer:
    """What the monitor reads: param_groups' d, d0, d_denom and telemetry()'s per-group report."""

    def __init__(self, ds: list[float], d0: float = 1e-6, **report) -> None:
        self.param_groups = [{"d": d, "d0": d0, "d_denom": 1.0} for d in ds]
        self.report = [
            {"d_frozen": False, "state_bytes": 100, "applied_lr": d, "nonfinite_skips": 0, **report}
            for d in ds
        ]

    def telemetry(self) -> list[dict]:
        return self.report


def config(**sections):
    data = {"name": "r", "model": {"path": "m"}, "dataset": {"path": "d"}, "training": {"max_steps": 100}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return validate_config(data)


def monitor(
    images: int = 20, names=("unet",), total_steps: int = 100, **sections
) -> tuple[HealthMonitor, Events]:
    events = Events()
    return HealthMonitor(config(**sections), events, total_steps, list(names), images), events


def healthy_d(step: int) -> float:
    return min(1e-6 * 2 ** (step / 2), 1e-4)  # grows out of d0 quickly, then flat


# ---------------------------------------------------------------- each warning, forced
def test_lr_not_one_says_what_the_step_is(capsys) -> None:
    health, events = monitor(optimizer={"lr": 0.5})
    health.at_start(0)
    health.at_start(0)
    assert events.codes() == ["lr_not_one"]
    assert "d × 0.5" in events.written[0]["message"] and events.written[0]["step"] == 0
    assert capsys.readouterr().err.count("warning: optimizer.lr = 0.5") == 1

    health, events = monitor(optimizer={"text_encoder_lr": 0.25}, lora={"train_text_encoder": True})
    health.at_start(0)
    assert events.codes() == ["lr_not_one"] and "text_encoder_lr = 0.25" in events.written[0]["message"]


@pytest.mark.parametrize(
    ("images", "state_bytes", "d_denom", "cause"),
    [
        (20, 0, 0.0, "no gradient reaches it"),
        (3, 100, 1.0, "only 3 images"),
        (20, 100, 1.0, "d0 = 1e-06 is too small"),
    ],
)
def test_d_stuck_names_what_the_numbers_point_to(images, state_bytes, d_denom, cause) -> None:
    health, events = monitor(images=images)
    optimizer = FakeOptimizer([1e-6], state_bytes=state_bytes)
    optimizer.param_groups[0]["d_denom"] = d_denom
    for step in range(1, 20):
        health.after_step(step, 1.0, optimizer)
    assert events.codes() == []  # before 10% of the run and 20 steps: d may still be on its way
    for step in range(20, 30):
        health.after_step(step, 1.0, optimizer)
    assert events.codes() == ["d_stuck"] and events.written[0]["step"] == 20
    assert cause in events.written[0]["message"]


def test_d_stuck_waits_for_a_short_run_to_get_going() -> None:
    """10% of a 32-step demo is step 4, before Prodigy's first rise: no warning until step 20."""
    health, events = monitor(images=20, total_steps=32)
    optimizer = FakeOptimizer([1e-6], state_bytes=100)
    optimizer.param_groups[0]["d_denom"] = 1.0
    for step in range(1, 20):
        health.after_step(step, 1.0, optimizer)
    assert events.codes() == []
    health.after_step(20, 1.0, optimizer)
    assert events.codes() == ["d_stuck"]


def test_d_growing_late_suggests_freezing() -> None:
    health, events = monitor()
    for step in range(1, 101):
        d = 1e-4 * (1 + max(0, step - 80) * 0.05)  # +5% a step from step 80: ×2 by step 100
        health.after_step(step, 1.0, FakeOptimizer([d]))
    assert events.codes() == ["d_growing_late"]
    assert (
        'prodigy_steps = "auto"' in events.written[0]["message"]
        and "d_limiter" in events.written[0]["message"]
    )
    assert events.written[0]["step"] == 91  # the first step where d passed 1.5 × its value at step 80

    health, events = monitor()
    frozen = FakeOptimizer([1e-4], d_frozen=True)
    for step in range(1, 101):
        frozen.param_groups[0]["d"] = frozen.report[0]["applied_lr"] = 1e-4 * step
        health.after_step(step, 1.0, frozen)
    assert "d_growing_late" not in events.codes()  # a frozen d does not grow; nothing to say


def test_text_encoder_far_above_the_denoiser() -> None:
    health, events = monitor(names=("unet", "text_encoder"), health={"text_encoder_d_ratio": 10.0})
    for step in range(1, 40):
        health.after_step(step, 1.0, FakeOptimizer([1e-4, 5e-4]))  # ×5: under the ratio
    assert events.codes() == []
    health.after_step(40, 1.0, FakeOptimizer([1e-4, 2e-3]))  # ×20
    assert events.codes() == ["text_encoder_d_high"]
    message = events.written[0]["message"]
    assert "20×" in message and "text_encoder_lr" in message and "split_groups_mean" in message


def test_overfitting_names_the_best_step() -> None:
    health, events = monitor()
    validation = {20: 0.50, 40: 0.45, 60: 0.46, 80: 0.47, 100: 0.48}
    for step in range(1, 101):
        health.after_step(step, 1.0 - step / 200, FakeOptimizer([healthy_d(step)]))  # training loss falls
        if step in validation:
            health.after_validation(step, validation[step], best_step=40)
    assert events.codes() == ["overfitting"]
    assert events.written[0]["step"] == 100 and "step 40" in events.written[0]["message"]

    health, events = monitor()  # validation rising while training loss rises too: not overfitting
    for step in range(1, 101):
        health.after_step(step, step / 100, FakeOptimizer([healthy_d(step)]))
        if step in validation:
            health.after_validation(step, validation[step], best_step=40)
    assert events.codes() == []


def test_nonfinite_gradients_counted_by_the_optimizer() -> None:
    weight = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = ProdigyPlusScheduleFree([weight], fused_back_pass=False)
    health, events = monitor()
    for step in range(1, 6):
        weight.grad = torch.full_like(weight, float("nan") if step >= 3 else 0.1)
        with pytest.warns(UserWarning) if step >= 3 else _nothing():
            optimizer.step()
        health.after_step(step, 1.0, optimizer)
    assert events.codes() == ["nonfinite_gradients"]
    assert (events.written[0]["count"], events.written[0]["since_step"]) == (1, 3)


def test_weight_decay_with_a_lora_gives_the_decay_per_step() -> None:
    health, events = monitor(optimizer={"weight_decay": 0.1, "weight_decay_by_lr": False})
    health.at_start(0)
    assert events.codes() == ["weight_decay_lora"] and events.written[0]["per_step"] == 0.1

    health, events = monitor(optimizer={"weight_decay": 0.1})  # scaled by d·lr: read once d has grown
    for step in range(1, 12):
        health.after_step(step, 1.0, FakeOptimizer([1e-3]))
    assert events.codes() == ["weight_decay_lora"] and events.written[0]["per_step"] == pytest.approx(1e-4)


def test_a_healthy_run_raises_none() -> None:
    health, events = monitor(names=("unet", "text_encoder"))
    health.at_start(0)
    for step in range(1, 101):
        d = healthy_d(step)
        health.after_step(step, 1.0 - step / 200, FakeOptimizer([d, 2 * d]))
        if step % 20 == 0:
            health.after_validation(step, 0.5 - step / 1000, best_step=step)
    assert events.codes() == []


def test_codes_are_remembered_across_resume() -> None:
    health, events = monitor(optimizer={"lr": 0.5})
    health.restore([{"type": "warning", "code": "lr_not_one", "step": 0, "message": "…"}])
    health.at_start(50)
    assert events.codes() == []


# ---------------------------------------------------------------- in a real run
def test_a_run_writes_coded_warnings_once(tmp_path, tiny_model, capsys) -> None:
    torch.set_num_threads(1)
    dataset = write_demo_dataset(tmp_path / "data", num_images=4)
    data = {
        "name": "run",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model)},
        "dataset": {"path": str(dataset), "resolution": 64},
        "lora": {"rank": 4},
        "training": {"max_steps": 12, "batch_size": 2, "precision": "fp32"},
        "optimizer": {"d0": 1e-4, "lr": 0.5, "weight_decay": 0.01},
        "saving": {"every_n_steps": 0, "formats": ["diffusers"], "dtype": "fp32"},
    }
    run_dir = training.train(validate_config(data))
    warnings = [e for e in read_events(run_dir) if e["type"] == "warning"]
    codes = [e["code"] for e in warnings]
    assert {"lr_not_one", "weight_decay_lora"} <= set(codes) and len(codes) == len(set(codes))
    assert all(e["code"] in CODES and e["message"] and "step" in e for e in warnings)
    err = capsys.readouterr().err
    assert err.count("optimizer.lr = 0.5") == 1 and err.count("optimizer.weight_decay = 0.01") == 1


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["demo.toml", "demo-flux.toml", "demo-flux2.toml"])
def test_the_demo_runs_raise_no_health_warning(tmp_path, monkeypatch, preset) -> None:
    from trainers.config import load_config

    torch.set_num_threads(1)
    monkeypatch.setenv("PPSF_DEMO_DIR", str(tmp_path / "demo"))
    overrides = [f"output_dir={tmp_path / 'runs'}", "dataset.validation=0.25", "validation.every_n_steps=25"]
    config = load_config(Path(__file__).resolve().parents[1] / "presets" / preset, overrides)
    run_dir = training.train(config)
    events = read_events(run_dir)
    assert [e for e in events if e["type"] == "warning" and e.get("code") in CODES] == []
    assert len([e for e in events if e["type"] == "validation"]) == config.training.max_steps // 25
