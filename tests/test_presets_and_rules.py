"""Presets parse and validate; the prodigy_steps rules; config overrides and messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainers.config import ConfigError, apply_override, load_config, validate_config
from trainers.freeze import auto_freeze_due, auto_freeze_window, prodigy_steps_for

PRESETS = sorted((Path(__file__).resolve().parents[1] / "presets").glob("*.toml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_is_a_valid_config(preset: Path) -> None:
    config = load_config(preset)
    assert config.optimizer.lr == 1.0 and config.optimizer.fused_back_pass
    assert config.dataset.resolution % 64 == 0


def test_presets_exist_for_each_vram_size_and_the_demo() -> None:
    assert {p.stem for p in PRESETS} >= {
        "demo",
        "sdxl_24gb",
        "sdxl_12gb",
        "sdxl_8gb",
        "demo-flux",
        "demo-flux2",
    }


def test_prodigy_steps_as_steps_fraction_or_auto() -> None:
    assert prodigy_steps_for(0, 1000) == 0
    assert prodigy_steps_for(300, 1000) == 300
    assert prodigy_steps_for(0.25, 1000) == 250
    assert prodigy_steps_for("auto", 1000) == 0  # the trainer decides while training


def test_auto_freeze_waits_for_a_flat_window() -> None:
    total = 1000
    window = auto_freeze_window(total)
    assert window == 50
    growing = [[1e-6 * 1.05**i] for i in range(300)]
    assert not auto_freeze_due(growing, 300, total)
    flat = growing[:100] + [[growing[99][0] * (1 + 0.005 * i / 200)] for i in range(200)]
    assert auto_freeze_due(flat, 300, total)
    assert not auto_freeze_due(flat[:60], 60, total), "never before 10% of the run and two windows"
    two_groups = [[d[0], 1e-6 * 1.05**i] for i, d in enumerate(flat)]
    assert not auto_freeze_due(two_groups, 300, total), "every group must be flat"


def test_overrides_parse_toml_values() -> None:
    data: dict = {}
    apply_override(data, "training.max_steps=500")
    apply_override(data, 'dataset.trigger_word="sks"')
    apply_override(data, "optimizer.betas=[0.95, 0.99]")
    apply_override(data, "model.path=stabilityai/sdxl")
    assert data == {
        "training": {"max_steps": 500},
        "dataset": {"trigger_word": "sks"},
        "optimizer": {"betas": [0.95, 0.99]},
        "model": {"path": "stabilityai/sdxl"},
    }
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_override(data, "training.max_steps")


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as error:
        validate_config(
            {
                "name": "x",
                "model": {"path": "m", "familly": "sdxl"},
                "dataset": {"path": "d", "resolution": 1000},
                "training": {"max_steps": 10, "batch_size": 0},
                "optimizer": {"prodigy_steps": 1.5},
            }
        )
    problems = error.value.problems
    assert len(problems) == 4
    assert any("model.familly: unknown key; did you mean 'family'?" in p for p in problems)
    assert any("training.batch_size" in p for p in problems)
    assert any("optimizer.prodigy_steps" in p for p in problems)
