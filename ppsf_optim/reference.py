"""The plain per-tensor step: the readable definition of the algorithm.

`step()` runs the faster multi-tensor version in `multi_tensor.py` where it applies, and the tests check that
it matches this one. The fused backward pass runs this version, one parameter at a time, from gradient hooks.

In fused mode a step cannot be skipped after the fact without a host sync per parameter, so `ok` (a 0-dim
bool tensor, False when the gradient has a NaN or inf) is folded into the decays instead: with the gradient
zeroed and every decay factor set to 1, a bad parameter's state and weights stay as they were.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .step_scalars import FOCUS_GAMMA, StepScalars
from .tensor_math import (
    RoundingNoise,
    factored_dims,
    factored_normaliser_dim,
    newton_schulz_orthogonalise,
    prodigy_slice,
    prodigy_slice_dtype,
    rms,
    write_back,
)


class GroupAccumulators:
    """Prodigy's per-step sums for one d (one group, or all groups when they share d), kept on device."""

    def __init__(self, device: torch.device) -> None:
        self.numerator = torch.zeros((), dtype=torch.float32, device=device)
        self.denominator = torch.zeros((), dtype=torch.float32, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.int32, device=device)

    def to(self, device: torch.device) -> GroupAccumulators:
        if self.numerator.device != device:
            self.numerator = self.numerator.to(device)
            self.denominator = self.denominator.to(device)
            self.nonfinite = self.nonfinite.to(device)
        return self


def init_state(p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
    """Fresh per-parameter state; memory per parameter matches release 1.8.33 or is lower."""
    state: dict[str, Any] = {}
    if group["use_muon_pp"] and p.ndim >= 2:
        state["muon_rms_sq"] = torch.zeros((), dtype=torch.float32, device=p.device)
    elif group["use_focus"]:
        state["focus_ema"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    else:
        dims = factored_dims(p.shape, group["factored"])
        if dims is None:
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            col_dim, row_dim = dims
            stats_dtype = torch.float32 if group["factored_fp32"] else p.dtype
            row_shape, col_shape = list(p.shape), list(p.shape)
            row_shape[row_dim] = 1
            col_shape[col_dim] = 1
            state["exp_avg_sq_row"] = torch.zeros(row_shape, dtype=stats_dtype, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(col_shape, dtype=stats_dtype, device=p.device)

    slice_dtype = prodigy_slice_dtype(p.dtype)
    if p.any():  # a zero-initialised weight (a LoRA up matrix) needs no copy of its start
        state["p0"] = prodigy_slice(p).to(dtype=slice_dtype, copy=True)
    else:
        state["p0"] = torch.zeros((), dtype=slice_dtype, device=p.device)
    if group["use_speed"]:
        for key in ("speed_dot_ema", "speed_max_l1", "speed_max_l2"):
            state[key] = torch.zeros((), dtype=torch.float32, device=p.device)
    else:
        state["s"] = torch.zeros_like(prodigy_slice(p), dtype=slice_dtype)

    if group["use_schedulefree"]:
        state["z"] = p.detach().clone(memory_format=torch.preserve_format)
    else:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _keep_if_bad(factor: float, ok: torch.Tensor | None) -> float | torch.Tensor:
    """A decay factor, replaced by 1 (keep everything) for a parameter whose gradient was not finite."""
    return factor if ok is None else torch.where(ok, factor, 1.0)


def _zero_if_bad(value: float, ok: torch.Tensor | None) -> float | torch.Tensor:
    return value if ok is None else torch.where(ok, value, 0.0)


def factored_denominator(row: torch.Tensor, col: torch.Tensor, col_dim: int, row_dim: int) -> torch.Tensor:
    """sqrt of the rank-1 second-moment estimate row * col / mean(row)."""
    row_mean = row.mean(dim=factored_normaliser_dim(col_dim, row_dim), keepdim=True).add_(1e-30)
    return row.div(row_mean).sqrt_() * col.sqrt()


def update_second_moment(
    state: dict[str, Any], grad: torch.Tensor, beta2: float, ok: torch.Tensor | None, before_update: bool
) -> torch.Tensor:
    """EMA of grad^2 (full or factored); returns sqrt of the estimate from after (or before) this grad."""

    def denominator() -> torch.Tensor:
        if "exp_avg_sq" in state:
            return state["exp_avg_sq"].sqrt()
        col_dim, row_dim = factored_dims(grad.shape, True)
        return factored_denominator(state["exp_avg_sq_row"], state["exp_avg_sq_col"], col_dim, row_dim)

    denom = denominator() if before_update else None
    decay = _keep_if_bad(beta2, ok)
    if "exp_avg_sq" in state:
        state["exp_avg_sq"].mul_(decay).addcmul_(grad, grad, value=1 - beta2)
    else:
        col_dim, row_dim = factored_dims(grad.shape, True)
        for key, dim in (("exp_avg_sq_row", row_dim), ("exp_avg_sq_col", col_dim)):
            mean_sq = grad.norm(dim=dim, keepdim=True).square_().div_(grad.shape[dim])
            mean_sq = mean_sq.to(state[key].dtype)  # statistics may be bf16 (factored_fp32=False)
            if ok is None:
                state[key].lerp_(mean_sq, weight=1 - beta2)
            else:
                state[key].mul_(decay).add_(mean_sq, alpha=1 - beta2)
    return denom if denom is not None else denominator()


def normalised_update(grad: torch.Tensor, denom: torch.Tensor, s: StepScalars) -> torch.Tensor:
    """Adam's grad / (sqrt(v) + eps), or Adam-atan2 when eps is None (scale-invariant, bounded)."""
    if s.eps is None:
        b = s.threshold
        return grad.atan2_(denom.mul_(b)).mul_(1 / math.atan(1 / b))
    return grad.div_(denom.add_(s.eps))


def orthogonalise_to_weights(update: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """OrthoGrad: drop the component of the update along the weights, keeping the update's norm."""
    w = weights.float().ravel()
    u = update.ravel()
    projected = u - (torch.dot(w, u) / (torch.dot(w, w) + 1e-30)) * w
    projected.mul_(u.norm() / (projected.norm() + 1e-30))
    return projected.view_as(update)


def stableadamw_(update: torch.Tensor, s: StepScalars) -> None:
    """StableAdamW: divide the update by max(1, rms(update) / threshold)."""
    scale = rms(update, 1.0).div_(s.threshold).clamp_min_(1.0)
    update.div_(scale)


def accumulate_prodigy(
    state: dict[str, Any],
    grad: torch.Tensor,
    point: torch.Tensor,
    s: StepScalars,
    acc: GroupAccumulators,
    ok: torch.Tensor | None,
) -> None:
    """Add this parameter's share of Prodigy's statistics <g, p0 - x> and ||s||_1 (x = z, or p without SF)."""
    if not s.prodigy_active:
        for key in ("s", "p0", "speed_dot_ema", "speed_max_l1", "speed_max_l2"):
            state.pop(key, None)  # d is frozen: free what only Prodigy needed
        return
    sliced_grad = prodigy_slice(grad)
    x0_minus = state["p0"] - prodigy_slice(point)
    if "s" in state:
        acc.numerator.add_(torch.dot(sliced_grad, x0_minus), alpha=s.d_k)
        state["s"].mul_(_keep_if_bad(s.beta3, ok)).add_(sliced_grad, alpha=s.d_k)
        acc.denominator.add_(state["s"].abs().sum())
    else:  # SPEED: EMA of <g, p0 - x>, normalised by the largest distance travelled
        dot_ema = state["speed_dot_ema"]
        dot_ema.lerp_(torch.dot(sliced_grad, x0_minus).float(), _zero_if_bad(1 - s.speed_beta, ok))
        l1 = torch.maximum(state["speed_max_l1"], x0_minus.float().norm(1))
        l2 = torch.maximum(state["speed_max_l2"], x0_minus.float().norm(2))
        state["speed_max_l1"].copy_(l1)
        state["speed_max_l2"].copy_(l2)
        acc.numerator.add_(dot_ema / (l1 + 1e-30) / (l2 + 1).square(), alpha=s.d_k)
        acc.denominator.add_(l2)


def schedulefree_update_(
    y: torch.Tensor, z: torch.Tensor, update: torch.Tensor, group: dict[str, Any], s: StepScalars, ok
) -> None:
    """One schedule-free step on the gradient point y and the base sequence z, in place.

    With x the average of the z's, y = (1 - beta1) z + beta1 x; the three lines below are z -= dlr u,
    x <- (1 - c) x + c z, and y recomputed from both.
    """
    ckp1 = _zero_if_bad(s.ckp1, ok)
    if s.decay != 0:  # decoupled weight decay, evaluated at y
        decay = _zero_if_bad(s.decay, ok)
        y.sub_(y * (decay * s.xy_step))
        z.sub_(y * decay)
    if group["use_cautious"] or group["use_grams"]:
        y_step = (y - z).mul_(ckp1).add_(update, alpha=s.dlr * s.xy_step)
        z.sub_(update, alpha=s.dlr)
        if group["use_cautious"]:  # C-Optim: only move y where the step agrees with the update
            mask = (y_step * update > 0).to(update.dtype)
            mask.mul_(mask.numel() / (mask.sum() + 1))
            y_step.mul_(mask)
        else:  # Grams: the step's magnitude with the update's sign
            y_step.abs_().mul_(update.sign())
        y.sub_(y_step)
    else:
        y.lerp_(z, ckp1 if ok is None else ckp1.to(y.dtype))
        y.sub_(update, alpha=s.dlr * s.xy_step)
        z.sub_(update, alpha=s.dlr)


def step_param_reference(
    p: torch.Tensor,
    group: dict[str, Any],
    state: dict[str, Any],
    s: StepScalars,
    acc: GroupAccumulators,
    noise: RoundingNoise,
    ok: torch.Tensor | None = None,
) -> bool:
    """Step one parameter from its `.grad`. Returns False if this step only primed statistics (ADOPT)."""
    grad = p.grad if ok is None else torch.where(ok, p.grad, 0)
    g32 = grad.to(dtype=torch.float32, copy=True)
    _, raw_beta2 = group["betas"]
    schedulefree = group["use_schedulefree"]
    weights_now = state["z"] if schedulefree else p

    if "muon_rms_sq" in state:
        update = newton_schulz_orthogonalise(g32)
        rms_sq = state["muon_rms_sq"]
        rms_sq.mul_(_keep_if_bad(raw_beta2, ok)).add_(rms(update, 1e-8).square() * (1 - raw_beta2))
        update.div_(rms_sq.sqrt() + 1e-12)
    elif "focus_ema" in state:  # FOCUS: sign of the gradient plus a pull toward the weights' EMA
        ema = state["focus_ema"]
        ema.mul_(_keep_if_bad(s.beta2, ok)).add_(weights_now, alpha=1 - s.beta2)
        update = g32.sign_().add_((weights_now - ema).sign_(), alpha=FOCUS_GAMMA)
        if ok is not None:
            update.mul_(ok)
    elif group["use_adopt"] and s.k == 1:
        update_second_moment(state, g32, 0.0, ok, before_update=False)
        return False
    else:
        if schedulefree:
            numerator = g32
        else:  # first moment, for the plain Prodigy-Adam path
            exp_avg = state["exp_avg"]
            exp_avg.mul_(_keep_if_bad(s.beta1, ok)).add_(g32, alpha=1 - s.beta1)
            numerator = exp_avg.to(dtype=torch.float32, copy=True)
        denom = update_second_moment(state, g32, s.beta2, ok, before_update=group["use_adopt"])
        update = normalised_update(numerator, denom, s)
        if not schedulefree and group["use_cautious"]:
            mask = (update * g32 > 0).to(update.dtype)
            update.mul_(mask.mul_(mask.numel() / (mask.sum() + 1)))
        elif not schedulefree and group["use_grams"]:
            update.abs_().mul_(g32.sign())

    if group["use_orthograd"]:
        update = orthogonalise_to_weights(update, weights_now)
    if group["use_stableadamw"]:
        stableadamw_(update, s)

    accumulate_prodigy(state, grad, weights_now, s, acc, ok)

    stochastic = group["stochastic_rounding"]
    y = p.float() if stochastic else p
    if schedulefree:
        z = state["z"]
        z32 = z.float() if stochastic else z
        schedulefree_update_(y, z32, update, group, s, ok)
        write_back(z, z32, group, noise)
    else:
        if s.decay != 0:
            y.mul_(1 - _zero_if_bad(s.decay, ok))
        y.sub_(update, alpha=s.dlr)
    write_back(p, y, group, noise)
    return True
