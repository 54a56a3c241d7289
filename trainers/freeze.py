"""When to freeze Prodigy's d: `optimizer.prodigy_steps` as steps, a fraction of the run, or "auto"."""

from __future__ import annotations

AUTO_GROWTH_TOLERANCE = 0.01  # d counts as flat when it grew less than 1% over the window


def prodigy_steps_for(setting: int | float | str, total_steps: int) -> int:
    """The optimizer's prodigy_steps: 0 (never, or decided later by the auto rule) or a step count."""
    if setting == "auto" or setting == 0:
        return 0
    if isinstance(setting, float):
        return max(1, round(setting * total_steps))
    return int(setting)


def auto_freeze_window(total_steps: int) -> int:
    """Steps over which d must stay flat: 5% of the run, at least 20."""
    return max(20, total_steps // 20)


def auto_freeze_due(d_history: list[list[float]], step: int, total_steps: int) -> bool:
    """True when every group's d grew less than 1% over the last window, once 10% of the run is done.

    Prodigy's d rises quickly, then flattens once it has found the step size; on diffusion losses it
    keeps creeping up afterwards, which is what freezing stops. `d_history[i]` is d per group after
    step `step - len(d_history) + 1 + i`.
    """
    window = auto_freeze_window(total_steps)
    if step < max(2 * window, total_steps // 10) or len(d_history) <= window:
        return False
    now, before = d_history[-1], d_history[-1 - window]
    return all(d_now <= d_before * (1 + AUTO_GROWTH_TOLERANCE) for d_now, d_before in zip(now, before))


def manual_freeze_refusal(optimizer) -> str | None:
    """Why d cannot be frozen now (it already is), or None. A manual freeze sets the groups'
    prodigy_steps, which the checkpoint saves, so it holds after a resume."""
    frozen = [r for r in optimizer.telemetry() if r["d_frozen"]]
    if frozen:
        return f"d is already frozen (since step {frozen[0]['d_frozen_since_step']})"
    return None
