"""The multi-tensor step() against the plain per-tensor reference step it must reproduce."""

from __future__ import annotations

import copy

import pytest
import torch

from optim_cases import run_trajectory
from ppsf_optim import ProdigyPlusScheduleFree, multi_tensor

FAST_PATH_OPTIONS = [
    {},
    {"factored": False},
    {"eps": None},
    {"use_bias_correction": True},
    {"weight_decay": 0.1},
    {"weight_decay": 0.05, "weight_decay_by_lr": False},
    {"prodigy_steps": 6},
    {"use_stableadamw": False},
    {"split_groups": False},
    {"d_limiter": True, "schedulefree_c": 8.0},
]


def _reference_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multi_tensor, "supports", lambda group, params: False)


def _used_fast_path(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = []
    original = multi_tensor.step_group

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(multi_tensor, "step_group", counting)
    return calls


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(
    "option", FAST_PATH_OPTIONS, ids=lambda o: ",".join(map(str, o.items())) or "defaults"
)
def test_fast_path_equals_reference_fp32(option: dict, groups: int, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:
        calls = _used_fast_path(m)
        fast = run_trajectory(lambda p: ProdigyPlusScheduleFree(p, **option), groups=groups)
        assert calls, "the multi-tensor path was not used"
    _reference_only(monkeypatch)
    reference = run_trajectory(lambda p: ProdigyPlusScheduleFree(p, **option), groups=groups)
    for a, b in zip(fast[0], reference[0]):
        assert a == pytest.approx(b, rel=1e-5)
    for name in reference[1]:
        torch.testing.assert_close(fast[1][name], reference[1][name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast[2][name], reference[2][name], rtol=1e-5, atol=1e-6)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 values at |x| (8 significant bits)."""
    exponent = torch.floor(torch.log2(x.float().abs().clamp_min(1e-30)))
    return torch.pow(2.0, exponent - 7)


def test_fast_path_equals_reference_bf16_one_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the same state, one bf16 step of each path lands within two bf16 steps of the other: both round
    (nearly) the same fp32 result stochastically, with different random draws, to one of its neighbours."""
    from optim_cases import gradient_stream, make_params, param_groups

    _reference_only(monkeypatch)
    params = make_params(torch.bfloat16)
    warm = ProdigyPlusScheduleFree(param_groups(params, 2), d0=1e-3)
    set_grads = gradient_stream(params)
    for t in range(6):
        set_grads(t)
        warm.step()
    set_grads(0)
    saved_state, saved_weights = warm.state_dict(), {k: p.detach().clone() for k, p in params.items()}
    monkeypatch.undo()

    results = {}
    for path in ("fast", "reference"):
        if path == "reference":
            _reference_only(monkeypatch)
        for k, p in params.items():
            p.data.copy_(saved_weights[k])
        optimizer = ProdigyPlusScheduleFree(param_groups(params, 2), d0=1e-3)
        optimizer.load_state_dict(copy.deepcopy(saved_state))  # loading aliases the dict's tensors
        optimizer.step()
        results[path] = {k: p.detach().clone() for k, p in params.items()}
    moved = 0
    for name, fast in results["fast"].items():
        reference = results["reference"][name]
        gap = (fast.float() - reference.float()).abs()
        assert torch.all(gap <= 2 * _bf16_ulp(torch.maximum(fast.float().abs(), reference.float().abs()))), (
            name
        )
        moved += int((fast != saved_weights[name]).sum())
    assert moved > 100, "the step should have changed many weights"


def test_fast_path_tracks_reference_bf16_over_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = run_trajectory(lambda p: ProdigyPlusScheduleFree(p, d0=1e-3), groups=2, dtype=torch.bfloat16)
    _reference_only(monkeypatch)
    reference = run_trajectory(lambda p: ProdigyPlusScheduleFree(p, d0=1e-3), groups=2, dtype=torch.bfloat16)
    assert fast[0][-1] == pytest.approx(reference[0][-1], rel=0.05)
    for name in reference[1]:
        assert fast[1][name].dtype == torch.bfloat16
        torch.testing.assert_close(fast[1][name].float(), reference[1][name].float(), rtol=0.05, atol=0.05)


def test_large_tensors_are_split_into_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multi_tensor, "MAX_BATCH_ELEMENTS", 100)
    small = run_trajectory(lambda p: ProdigyPlusScheduleFree(p), groups=1)
    monkeypatch.undo()
    _reference_only(monkeypatch)
    reference = run_trajectory(lambda p: ProdigyPlusScheduleFree(p), groups=1)
    for name in reference[1]:
        torch.testing.assert_close(small[1][name], reference[1][name], rtol=1e-5, atol=1e-6)


def _drift_start(generator: torch.Generator) -> torch.Tensor:
    """Weights in [1, 1.5), exactly representable in bf16 (so both runs start from the same values)."""
    return (1.0 + 0.5 * torch.rand(64, 64, generator=generator)).to(torch.bfloat16)


def _drift_run(dtype: torch.dtype, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, z, x) after `steps` steps whose every update is below half a bf16 step of the weights.

    d is frozen at d0 = 1e-3 (prodigy_steps=1) and the gradient has a constant sign, so z moves by about
    1e-3 per step, while weights in [0.5, 2) have bf16 steps of 2^-8..2^-7 (half-steps of 0.002..0.004).
    The gradients do not depend on the weights, so the fp32 and bf16 runs see exactly the same ones.
    """
    generator = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(_drift_start(generator).to(dtype))
    torch.manual_seed(0)  # the rounding noise's seed is torch.initial_seed() at construction
    optimizer = ProdigyPlusScheduleFree([p], d0=1e-3, prodigy_steps=1)
    for _ in range(steps):
        p.grad = (1.0 + 0.5 * torch.randn(64, 64, generator=generator)).to(dtype)
        optimizer.step()
    y, z = p.detach().float().clone(), optimizer.state[p]["z"].float().clone()
    optimizer.eval()
    return y, z, p.detach().float().clone()


def test_fast_path_bf16_tracks_fp32_where_each_update_is_below_half_a_bf16_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stochastic rounding is unbiased, so the bf16 run's weights stay on the fp32 run's trajectory on
    average; rounding to nearest would leave every weight where it started (each update rounds away)."""
    steps = 300
    calls = _used_fast_path(monkeypatch)
    bf16 = _drift_run(torch.bfloat16, steps)
    assert calls, "the multi-tensor path was not used"
    fp32 = _drift_run(torch.float32, steps)
    start = _drift_start(torch.Generator().manual_seed(3)).float()
    for name, low, high in zip(("y", "z", "x"), bf16, fp32):
        drift = (high - start).mean().item()
        assert drift < -0.1, f"{name}: the fp32 run should have drifted well away from its start ({drift})"
        # bias of the bf16 run relative to fp32: each element's rounding errors add up like a random walk
        # (~0.04 here); averaged over 4096 elements that leaves ~6e-4
        bias = (low - high).mean().item()
        assert abs(bias) < 0.01 * abs(drift) + 2e-3, f"{name}: bf16 is off the fp32 trajectory by {bias}"
        spread = (low - high).std().item()
        assert spread < 0.1, f"{name}: the bf16 run's elements scatter by {spread} around fp32's"
