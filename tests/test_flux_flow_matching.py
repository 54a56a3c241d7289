"""The flow-matching pieces against diffusers' training utilities (oracle) and the written-out math."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from pydantic import ValidationError

from trainers.models.flow_matching import (
    FluxTrainingOptions,
    flow_matching_loss,
    flux_options,
    loss_weights,
    noisy_latents,
    resolution_mu,
    sample_base_sigmas,
    sample_sigmas,
    shift_for,
    shift_sigmas,
    velocity_target,
)

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _generator(seed: int = 3) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    ("options", "scheme", "kwargs"),
    [
        (FluxTrainingOptions(timestep_sampling="uniform"), "uniform", {}),
        (
            FluxTrainingOptions(timestep_sampling="logit_normal", logit_mean=0.3, logit_std=1.4),
            "logit_normal",
            {"logit_mean": 0.3, "logit_std": 1.4},
        ),
        # sigmoid(scale * N(0, 1)) is the logit-normal density with mean 0 and std = scale
        (
            FluxTrainingOptions(timestep_sampling="sigmoid", sigmoid_scale=2.0),
            "logit_normal",
            {"logit_mean": 0.0, "logit_std": 2.0},
        ),
    ],
)
def test_base_sigmas_match_diffusers_density(options, scheme, kwargs) -> None:
    ours = sample_base_sigmas(options, 4096, _generator(), CPU)
    oracle = compute_density_for_timestep_sampling(scheme, 4096, generator=_generator(), **kwargs)
    torch.testing.assert_close(ours, oracle, atol=1e-6, rtol=0)
    assert ours.min() > 0 and ours.max() < 1


@pytest.mark.parametrize("tokens", [16, 256, 1024, 4096, 6400])
def test_resolution_shift_is_fluxs_calculate_shift_and_the_schedulers_time_shift(tokens) -> None:
    assert resolution_mu(tokens) == pytest.approx(calculate_shift(tokens), abs=1e-12)
    sigmas = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = calculate_shift(tokens)
    expected = scheduler.time_shift(mu, 1.0, sigmas)  # e^mu / (e^mu + (1 / sigma - 1))
    torch.testing.assert_close(shift_sigmas(sigmas, math.exp(mu)), expected, atol=1e-12, rtol=0)


def test_shift_settings() -> None:
    assert shift_for(FluxTrainingOptions(timestep_shift="none"), 4096) == 1.0
    assert shift_for(FluxTrainingOptions(timestep_shift=3.0), 4096) == 3.0
    assert shift_for(FluxTrainingOptions(), 4096) == pytest.approx(math.exp(1.15))
    sigmas = torch.tensor([0.25, 0.5, 0.75])
    # written out: s sigma / (1 + (s - 1) sigma) with s = 3
    torch.testing.assert_close(shift_sigmas(sigmas, 3.0), torch.tensor([0.5, 0.75, 0.9]))
    shifted = sample_sigmas(FluxTrainingOptions(timestep_shift=3.0), 8, 1024, _generator(), CPU)
    torch.testing.assert_close(
        shifted, shift_sigmas(sample_base_sigmas(FluxTrainingOptions(), 8, _generator(), CPU), 3.0)
    )


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weights_match_diffusers(weighting) -> None:
    sigmas = torch.rand(64, generator=_generator()) * 0.98 + 0.01
    torch.testing.assert_close(
        loss_weights(weighting, sigmas).float(), compute_loss_weighting_for_sd3(weighting, sigmas).float()
    )


def test_noisy_latents_are_the_straight_path_and_the_target_its_velocity() -> None:
    x0 = torch.randn(2, 16, 4, 4, generator=_generator(1))
    noise = torch.randn(2, 16, 4, 4, generator=_generator(2))
    sigmas = torch.tensor([0.0, 1.0])
    ends = noisy_latents(x0, noise, sigmas)
    torch.testing.assert_close(ends[0], x0[0])
    torch.testing.assert_close(ends[1], noise[1])
    # d x_t / d sigma by central differences equals noise - x0
    sigma, h = torch.tensor([0.3, 0.6], dtype=torch.float64), 1e-6
    x0d, noised = x0.double(), noise.double()
    slope = (noisy_latents(x0d, noised, sigma + h) - noisy_latents(x0d, noised, sigma - h)) / (2 * h)
    torch.testing.assert_close(slope, velocity_target(x0d, noised), atol=1e-6, rtol=0)


def test_loss_is_the_weighted_per_sample_mse() -> None:
    x0, noise, prediction = (torch.randn(3, 4, 2, 2, generator=_generator(s)) for s in (1, 2, 3))
    sigmas = torch.tensor([0.2, 0.5, 0.9])
    loss = flow_matching_loss(prediction, x0, noise, sigmas, "sigma_sqrt")
    expected = torch.stack(
        [((prediction[i] - (noise[i] - x0[i])) ** 2).mean() / sigmas[i] ** 2 for i in range(3)]
    )
    torch.testing.assert_close(loss, expected)


def test_options_reject_bad_values_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="lora_targets"):
        FluxTrainingOptions(lora_targets="attention+everything")
    with pytest.raises(ValidationError, match="lora_targets"):
        FluxTrainingOptions(lora_targets=[])
    with pytest.raises(ValidationError, match="timestep_shift"):
        FluxTrainingOptions(timestep_shift=-1.0)
    with pytest.raises(ValidationError, match="guidance: schnell has no guidance embedding"):
        FluxTrainingOptions(variant="schnell", guidance=1.0)
    with pytest.raises(ValidationError, match="quantize_base"):
        FluxTrainingOptions(quantize_base="int4")


def test_accessor_reads_the_section_or_gives_defaults() -> None:
    class WithSection:
        flux = FluxTrainingOptions(loss_weighting="cosmap")

    assert flux_options(WithSection()).loss_weighting == "cosmap"
    assert flux_options(object()) == FluxTrainingOptions()
