"""The Flux presets load through the real schema, with the family and options they were written for."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainers.config import load_config

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"
FLUX_PRESETS = sorted(
    path for path in PRESETS_DIR.glob("*.toml") if path.stem.startswith(("flux", "demo-flux"))
)


@pytest.mark.parametrize("preset", FLUX_PRESETS, ids=lambda p: p.name)
def test_every_flux_preset_loads_as_its_family(preset: Path) -> None:
    config = load_config(preset)
    expected = "flux2" if "flux2" in preset.stem else "flux"
    assert config.model.family == expected
    assert config.optimizer.lr == 1.0 and config.optimizer.fused_back_pass
    assert config.dataset.resolution % 64 == 0
    if "schnell" in config.model.path.lower() or expected == "flux2":
        assert config.flux.guidance is None, "only Flux.1-dev has a guidance embedding"


def test_flux_presets_cover_the_issues_tiers() -> None:
    assert {p.stem for p in FLUX_PRESETS} == {
        "demo-flux", "demo-flux2", "flux1-dev-24gb", "flux1-dev-16gb", "flux1-schnell-16gb",
        "flux2-klein-4b-12gb", "flux2-klein-9b-16gb", "flux2-klein-9b-24gb",
    }  # fmt: skip
