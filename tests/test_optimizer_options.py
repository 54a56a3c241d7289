"""Options of later releases, each checked for what it promises, and schedule-free math written out."""

from __future__ import annotations

import math

import pytest
import torch

from optim_cases import run_trajectory
from ppsf_optim import ProdigyPlusScheduleFree

PLAIN = {"factored": False, "use_stableadamw": False}  # u = g / (sqrt(v) + eps): easy to write out


def test_d_limiter_caps_growth_per_step() -> None:
    limited = run_trajectory(lambda p: ProdigyPlusScheduleFree(p, d_limiter=True), groups=2, steps=40)[0]
    free = run_trajectory(lambda p: ProdigyPlusScheduleFree(p), groups=2, steps=40)[0]
    ratios = [b / a for prev, cur in zip(limited, limited[1:]) for a, b in zip(prev, cur)]
    assert max(ratios) <= 2**0.25 * (1 + 1e-12)
    assert max(ratios) == pytest.approx(2**0.25), "the cap should be reached while d is far too small"
    assert limited[-1][0] > 50 * 1e-6, "d still grows, just not faster than the cap"
    assert max(b / a for prev, cur in zip(free, free[1:]) for a, b in zip(prev, cur)) > 2**0.25


def _written_out_schedule_free(z0, grads, lr, beta1, beta2, eps, c_strength=0.0):
    """Schedule-free RMSprop (constant step size lr), with the optional refined averaging weight."""
    z, x, v = z0.clone(), z0.clone(), torch.zeros_like(z0)
    weight_sum = 0.0
    for grad in grads:
        y = (1 - beta1) * z + beta1 * x  # the gradient point
        v = beta2 * v + (1 - beta2) * grad**2
        z = z - lr * grad / (v.sqrt() + eps)
        weight_sum += lr**2
        c = lr**2 / weight_sum
        if c_strength:
            c = min(1.0, c * (1 - beta1) * c_strength)
        x = (1 - c) * x + c * z
    y = (1 - beta1) * z + beta1 * x
    return y, x


@pytest.mark.parametrize("c_strength", [0.0, 4.0, 10.0])
def test_schedule_free_averaging_matches_the_written_out_recursion(c_strength: float) -> None:
    """With d frozen at d0 (prodigy_steps=1), the optimizer is schedule-free RMSprop with step size d0*lr.
    The gradient is evaluated at y, so the written-out recursion is fed the optimizer's own y each step."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50))
    z0 = p.detach().clone()
    optimizer = ProdigyPlusScheduleFree([p], d0=0.01, prodigy_steps=1, schedulefree_c=c_strength, **PLAIN)
    target = torch.randn(50)
    grads = []
    for _ in range(30):
        grad = 2 * (p.detach() - target)
        grads.append(grad)
        p.grad = grad.clone()
        optimizer.step()
    y, x = _written_out_schedule_free(z0, grads, 0.01, 0.9, 0.99, 1e-8, c_strength)
    torch.testing.assert_close(p.detach(), y, rtol=1e-5, atol=1e-6)
    optimizer.eval()
    torch.testing.assert_close(p.detach(), x, rtol=1e-5, atol=1e-6)


def test_schedulefree_c_of_one_over_one_minus_beta1_is_plain_schedule_free() -> None:
    plain = run_trajectory(lambda p: ProdigyPlusScheduleFree(p), groups=1)
    refined = run_trajectory(lambda p: ProdigyPlusScheduleFree(p, schedulefree_c=1 / (1 - 0.9)), groups=1)
    for name in plain[1]:
        torch.testing.assert_close(refined[2][name], plain[2][name], rtol=1e-5, atol=1e-6)


def test_frozen_d_equals_schedulefree_wrapper_around_rmsprop() -> None:
    """An independent oracle: Meta's ScheduleFreeWrapperReference around torch's RMSprop (test-only)."""
    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    mine = torch.nn.Parameter(torch.randn(32, 8))
    theirs = torch.nn.Parameter(mine.detach().clone())
    optimizer = ProdigyPlusScheduleFree([mine], d0=0.02, prodigy_steps=1, **PLAIN)
    wrapper = schedulefree.ScheduleFreeWrapperReference(
        torch.optim.RMSprop([theirs], lr=0.02, alpha=0.99, eps=1e-8), momentum=0.9
    )
    wrapper.train()
    wrapper.state[theirs].update(
        step=torch.tensor(0.0), square_avg=torch.zeros_like(theirs)
    )  # as its own tests do
    target = torch.randn(32, 8)
    for _ in range(40):
        for p in (mine, theirs):
            p.grad = 2 * (p.detach() - target) + 0.1 * torch.sin(p.detach() * 7)
        optimizer.step()
        wrapper.step()
    torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
    optimizer.eval()
    wrapper.eval()
    torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)


def test_without_schedulefree_it_is_prodigy_adam_with_a_first_moment() -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(40))
    start = p.detach().clone()
    lr, beta1, beta2, eps, decay = 0.01, 0.9, 0.99, 1e-8, 0.1
    optimizer = ProdigyPlusScheduleFree(
        [p], d0=lr, prodigy_steps=1, use_schedulefree=False, weight_decay=decay, **PLAIN
    )
    optimizer.eval()  # no-ops without schedule-free
    m, v, expected = torch.zeros(40), torch.zeros(40), start.clone()
    for t in range(25):
        grad = torch.cos(torch.arange(40.0) + t) + expected
        p.grad = grad.clone()
        optimizer.step()
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad**2
        expected = expected * (1 - decay * lr) - lr * m / (v.sqrt() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)
    assert "z" not in optimizer.state[p] and "exp_avg" in optimizer.state[p]


def test_without_schedulefree_prodigy_still_estimates_d() -> None:
    ds = run_trajectory(lambda p: ProdigyPlusScheduleFree(p, use_schedulefree=False), groups=2)[0]
    assert ds[-1][0] > 20 * 1e-6
    assert all(b >= a for prev, cur in zip(ds, ds[1:]) for a, b in zip(prev, cur))


def test_factored_fp32_false_keeps_statistics_in_the_weight_dtype() -> None:
    *_, optimizer = run_trajectory(
        lambda p: ProdigyPlusScheduleFree(p, factored_fp32=False, d0=1e-3), dtype=torch.bfloat16, steps=5
    )
    states = [s for s in optimizer.state.values() if "exp_avg_sq_row" in s]
    assert states and all(s["exp_avg_sq_row"].dtype == torch.bfloat16 for s in states)
    *_, default = run_trajectory(lambda p: ProdigyPlusScheduleFree(p, d0=1e-3), dtype=torch.bfloat16, steps=5)
    assert all(
        s["exp_avg_sq_row"].dtype == torch.float32 for s in default.state.values() if "exp_avg_sq_row" in s
    )


def test_speed_grows_d_without_an_s_buffer() -> None:
    ds, *_, optimizer = run_trajectory(
        lambda p: ProdigyPlusScheduleFree(p, use_speed=True), groups=2, steps=40
    )
    assert all("s" not in s and "speed_dot_ema" in s for s in optimizer.state.values())
    ratios = [b / a for prev, cur in zip(ds, ds[1:]) for a, b in zip(prev, cur)]
    assert min(ratios) >= 1.0 and max(ratios) <= 2**0.25 * (1 + 1e-12)
    assert ds[-1][0] > 3 * 1e-6


def _first_step_update(**options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights before, grad, u) of step 1, where c = 1 so y = z = z0 - d0 * lr * u afterwards."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(24, 6))
    before = p.detach().clone()
    optimizer = ProdigyPlusScheduleFree([p], d0=0.01, prodigy_steps=1, **options)
    p.grad = torch.randn(24, 6) + 0.5 * before
    grad = p.grad.clone()
    optimizer.step()
    return before, grad, (before - p.detach()) / 0.01


def test_orthograd_update_is_orthogonal_to_the_weights_with_the_same_norm() -> None:
    before, _, plain = _first_step_update(**PLAIN)
    _, _, ortho = _first_step_update(use_orthograd=True, **PLAIN)
    cosine = torch.dot(ortho.ravel(), before.ravel()) / (ortho.norm() * before.norm())
    assert abs(cosine) < 1e-4
    assert abs(torch.dot(plain.ravel(), before.ravel()) / (plain.norm() * before.norm())) > 1e-2
    assert ortho.norm().item() == pytest.approx(plain.norm().item(), rel=1e-4)


def test_focus_update_is_gradient_sign_plus_pull_toward_the_weight_average() -> None:
    before, grad, update = _first_step_update(use_focus=True, factored=False, use_stableadamw=False)
    # step 1: the weights' EMA is (1 - beta2) z, so w - ema = beta2 z and the pull term is 0.1 sign(z)
    expected = torch.sign(grad) + 0.1 * torch.sign(before)
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-4)


def test_all_later_options_together_stay_finite() -> None:
    options = dict(use_orthograd=True, d_limiter=True, schedulefree_c=6.0, factored_fp32=False)
    ds, train, evals, _ = run_trajectory(lambda p: ProdigyPlusScheduleFree(p, **options), groups=2)
    assert all(math.isfinite(d) for step in ds for d in step)
    assert all(torch.isfinite(w).all() for w in list(train.values()) + list(evals.values()))
