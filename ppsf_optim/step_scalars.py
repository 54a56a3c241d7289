"""Per-group scalars of one optimizer step, computed once and shared by every parameter of the group."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .tensor_math import clip_threshold

FOCUS_GAMMA = 0.1
D_LIMITER_GROWTH = 2**0.25


@dataclass(frozen=True)
class StepScalars:
    k: int  # 1-based step counter of the group
    d: float  # the group's own d: scales Prodigy's statistics
    d_k: float  # weight of this step's Prodigy statistics, (d0 / d) * d as in release 1.8.33
    dlr: float  # step size: d (or the groups' harmonic mean d) times lr
    beta1: float
    beta2: float  # second-moment decay after the optional bias correction
    beta3: float  # decay of Prodigy's numerator and s
    eps: float | None  # None selects Adam-atan2
    ckp1: float  # schedule-free averaging weight c_{k+1} = w_k / sum(w)
    xy_step: float  # 1 - beta1 (1 - c_{k+1}): the y step relative to the z step
    decay: float  # decoupled weight decay this step (times dlr when weight_decay_by_lr)
    threshold: float  # StableAdamW clip threshold and Adam-atan2 scale
    prodigy_active: bool  # False once prodigy_steps has frozen d
    weight_sum: float  # schedule-free weight sum including this step
    speed_beta: float  # SPEED's EMA factor 1 - k^-0.75


def is_frozen(group: dict[str, Any]) -> bool:
    """True once `prodigy_steps` has frozen the group's d."""
    return 0 < group["prodigy_steps"] <= group["k"]


def bias_corrected_beta2(beta2: float, k: int) -> float:
    """Release 1.8.33's Adafactor/PaLM-style beta2 with its bias correction, used as the EMA decay."""
    beta2 = min(beta2, 1 - k**-0.8)
    return (1 - beta2) / (1 - beta2**k)


def step_scalars(group: dict[str, Any], shared_d: float | None) -> StepScalars:
    """Scalars for the next step of `group`; `shared_d` is the groups' harmonic-mean d when it applies."""
    k = group["k"]
    d, d0 = group["d"], group["d0"]
    beta1, beta2 = group["betas"]
    if group["use_bias_correction"]:
        beta2 = bias_corrected_beta2(beta2, k)
    dlr = (shared_d if shared_d else d) * group["lr"]

    # schedule-free averaging: iterates weighted by the squared step size
    weight = dlr**2
    weight_sum = group["weight_sum"] + weight
    ckp1 = weight / weight_sum if weight_sum else 0.0
    if group["schedulefree_c"] > 0:  # refined schedule-free averaging (arXiv 2507.09846)
        ckp1 = min(1.0, ckp1 * (1 - beta1) * group["schedulefree_c"])
    xy_step = 1 - beta1 * (1 - ckp1)

    decay = group["weight_decay"] * (dlr if group["weight_decay_by_lr"] else 1.0)
    return StepScalars(
        k=k,
        d=d,
        d_k=(d0 / d) * d,
        dlr=dlr,
        beta1=beta1,
        beta2=beta2,
        beta3=group["beta3"],
        eps=group["eps"],
        ckp1=ckp1,
        xy_step=xy_step,
        decay=decay,
        threshold=clip_threshold(k),
        prodigy_active=not is_frozen(group),
        weight_sum=weight_sum,
        speed_beta=1 - k**-0.75,
    )


def next_d(group: dict[str, Any], numerator_increment: float, denominator: float) -> tuple[float, float]:
    """Prodigy's d after one step, and the new numerator EMA, from this step's accumulated statistics.

    d_hat = atan2(d_coef * N, D) with N the beta3-EMA of <g, p0 - z> and D the l1 norm of s. A negative
    increment is ignored while d is still d0 and otherwise may only lower N, so d grows only on evidence;
    d never decreases. With `d_limiter`, d_hat is capped at 2^0.25 d.
    """
    d, d0 = group["d"], group["d0"]
    numerator = group["d_numerator"] * group["beta3"]
    if numerator_increment < 0:
        if d > d0:
            numerator = min(numerator, numerator_increment)
    else:
        numerator += numerator_increment
    d_hat = math.atan2(group["d_coef"] * numerator, denominator)
    if group["d_limiter"]:
        d_hat = min(d_hat, D_LIMITER_GROWTH * d)
    return max(d, d_hat), numerator


def next_d_speed(group: dict[str, Any], numerator_increment: float) -> tuple[float, float]:
    """SPEED's d: grow by the relative growth of its numerator, at most 2^0.25 per step, never shrink."""
    d = group["d"]
    previous = group["d_numerator"]
    numerator = previous * group["beta3"] + numerator_increment
    if numerator >= group["max_d_numerator"] and numerator > 0 and previous > 0:
        growth = min(D_LIMITER_GROWTH, math.sqrt(numerator / previous)) * group["d_coef"] ** 0.125
        d = max(d, d * growth)
    return d, numerator
