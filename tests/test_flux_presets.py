"""The Flux preset drafts are valid against today's schema plus the [flux] section they wait for."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from trainers.config import validate_config
from trainers.models.flow_matching import FluxTrainingOptions

DRAFTS = sorted((Path(__file__).resolve().parents[1] / "presets" / "flux-drafts").glob("*.toml"))


@pytest.mark.parametrize("preset", DRAFTS, ids=lambda p: p.name)
def test_every_flux_draft_is_valid_once_the_flux_section_is_in_the_schema(preset: Path) -> None:
    data = tomllib.loads(preset.read_text(encoding="utf-8"))
    options = FluxTrainingOptions(**data.pop("flux"))
    assert data["model"]["family"] in ("flux", "flux2")
    data["model"]["family"] = "sdxl"  # the only family today's schema accepts; everything else is checked
    config = validate_config(data)
    assert config.optimizer.lr == 1.0 and config.optimizer.fused_back_pass
    assert config.dataset.resolution % 64 == 0
    assert options.guidance is None or "schnell" not in config.model.path


def test_drafts_cover_the_issues_tiers() -> None:
    assert {p.stem for p in DRAFTS} == {
        "demo-flux", "demo-flux2", "flux1-dev-24gb", "flux1-dev-16gb", "flux1-schnell-16gb",
        "flux2-klein-4b-12gb", "flux2-klein-9b-16gb", "flux2-klein-9b-24gb",
    }  # fmt: skip
