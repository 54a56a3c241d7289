"""ppsf_optim against the public release 1.8.33 (a test-only dependency), option by option, in float32."""

from __future__ import annotations

import importlib.metadata
import os

import pytest
import torch

import optim_cases
from optim_cases import SHAPES, run_trajectory
from ppsf_optim import ProdigyPlusScheduleFree

ORACLE_DISTRIBUTION, ORACLE_VERSION = "prodigy-plus-schedule-free", "1.8.33"
INSTALL = "pip install -r requirements-dev.txt"


def _installed_oracle_version() -> str | None:
    try:
        return importlib.metadata.version(ORACLE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


ORACLE_FOUND = _installed_oracle_version()
IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
if ORACLE_FOUND is None and not IN_CI:
    pytest.skip(
        f"the oracle {ORACLE_DISTRIBUTION}=={ORACLE_VERSION} is not installed ({INSTALL}); CI fails without it",
        allow_module_level=True,
    )
if ORACLE_FOUND == ORACLE_VERSION:
    import prodigyplus

    Reference = prodigyplus.ProdigyPlusScheduleFree


@pytest.fixture(autouse=True)
def _exact_oracle_release() -> None:
    """Every comparison here is against release 1.8.33 exactly: another release (or none, in CI) fails
    each test with one message instead of a wall of trajectory mismatches."""
    if ORACLE_FOUND != ORACLE_VERSION:
        found = "is not installed" if ORACLE_FOUND is None else f"is {ORACLE_FOUND}"
        pytest.fail(
            f"the oracle {ORACLE_DISTRIBUTION} {found}; these tests need exactly {ORACLE_VERSION} ({INSTALL})",
            pytrace=False,
        )


# Every constructor argument of 1.8.33 away from its default (fused_back_pass is covered below).
OPTIONS = [
    {},
    {"lr": 0.5},
    {"betas": (0.95, 0.999)},
    {"beta3": 0.9},
    {"weight_decay": 0.1},
    {"weight_decay": 0.05, "weight_decay_by_lr": False},
    {"use_bias_correction": True},
    {"d0": 1e-4},
    {"d_coef": 2.0},
    {"prodigy_steps": 8},
    {"eps": None},
    {"eps": 1e-6},
    {"split_groups": False},
    {"split_groups_mean": False},
    {"factored": False},
    {"use_stableadamw": False},
    {"use_cautious": True},
    {"use_grams": True},
    {"use_adopt": True},
    {"stochastic_rounding": False},
    {"use_bias_correction": True, "eps": None, "weight_decay": 0.1},
]


def _option_id(option: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in option.items()) or "defaults"


def assert_same_trajectory(mine, reference) -> None:
    ds_mine, train_mine, eval_mine, _ = mine
    ds_ref, train_ref, eval_ref, _ = reference
    for step, (a, b) in enumerate(zip(ds_mine, ds_ref)):
        assert a == pytest.approx(b, rel=1e-5), f"d differs at step {step + 1}"
    for name in train_ref:
        torch.testing.assert_close(
            train_mine[name], train_ref[name], rtol=1e-5, atol=1e-6, msg=f"y of {name}"
        )
        torch.testing.assert_close(eval_mine[name], eval_ref[name], rtol=1e-5, atol=1e-6, msg=f"x of {name}")


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("option", OPTIONS, ids=_option_id)
def test_matches_release_1_8_33(option: dict, groups: int) -> None:
    mine = run_trajectory(lambda p: ProdigyPlusScheduleFree(p, **option), groups=groups)
    reference = run_trajectory(lambda p: Reference(p, **option), groups=groups)
    assert mine[0][-1][0] > 5 * (option.get("d0", 1e-6)) or option.get("prodigy_steps"), "d should have grown"
    assert_same_trajectory(mine, reference)


def test_matches_release_with_eval_train_between_steps() -> None:
    mine = run_trajectory(lambda p: ProdigyPlusScheduleFree(p), groups=2, eval_every=2)
    reference = run_trajectory(lambda p: Reference(p), groups=2, eval_every=2)
    assert_same_trajectory(mine, reference)


def test_muon_matches_release_on_2d_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    # 1.8.33 raises on conv weights with use_muon_pp; compare on everything else
    monkeypatch.setattr(optim_cases, "SHAPES", {k: v for k, v in SHAPES.items() if k != "conv"})
    mine = run_trajectory(lambda p: ProdigyPlusScheduleFree(p, use_muon_pp=True), groups=2)
    reference = run_trajectory(lambda p: Reference(p, use_muon_pp=True), groups=2)
    assert_same_trajectory(mine, reference)


def _fused_run(factory, steps: int = 20):
    """Step from post-accumulate-grad hooks (OneTrainer style: step_param, then free the grad)."""
    from optim_cases import make_params, param_groups

    params = make_params()
    optimizer = factory(param_groups(params, 2))
    for group in optimizer.param_groups:
        for p in group["params"]:

            def hook(p, group=group):
                optimizer.step_param(p, group)
                p.grad = None

            p.register_post_accumulate_grad_hook(hook)
    generator = torch.Generator().manual_seed(5)
    targets = {k: torch.randn(p.shape, generator=generator) for k, p in params.items()}
    ds = []
    for _ in range(steps):
        loss = sum(((p - targets[k]) ** 2).sum() for k, p in params.items())
        loss.backward()
        optimizer.step()  # a no-op for 1.8.33 with fused_back_pass=True
        ds.append([g["d"] for g in optimizer.param_groups])
    return ds, {k: p.detach().clone() for k, p in params.items()}


def test_fused_back_pass_matches_release() -> None:
    ds_mine, w_mine = _fused_run(lambda p: ProdigyPlusScheduleFree(p, fused_back_pass=True))
    ds_ref, w_ref = _fused_run(lambda p: Reference(p, fused_back_pass=True))
    for a, b in zip(ds_mine, ds_ref):
        assert a == pytest.approx(b, rel=1e-5)
    for name in w_ref:
        torch.testing.assert_close(w_mine[name], w_ref[name], rtol=1e-5, atol=1e-6)
