"""d-health warnings: what the optimizer's numbers say about the run, in words a user can act on.

Each warning is a `warning` event with a `code` (see events.py), written and printed once per run; a resumed
run knows which it gave already from the events it kept. The monitor reads what the trainer hands it after
each step and each validation; it never touches the optimizer.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from tqdm import tqdm

from trainers.config import TrainConfig

# ---------------------------------------------------------------- thresholds (one place, one reason each)
STUCK_AFTER = 0.10  # Prodigy's d leaves d0 within the first few percent of a healthy run
STUCK_MIN_STEPS = 20  # but its first rise can take a dozen steps: 10% of a 32-step demo is too early
STUCK_GROWTH = 1.1  # d below 1.1 × d0 has not really moved (growth is multiplicative, ×2^0.25 per step max)
FEW_IMAGES = 5  # fewer images give a gradient too noisy for Prodigy's correlation estimate to grow on
LATE_WINDOW = 0.20  # "the end of the run": the last 20% of the steps
LATE_GROWTH = 1.5  # d still growing by half over the last 20%: it has not found its step size yet
TEXT_ENCODER_CHECK_AFTER = 0.10  # group d's are meaningless while they all still climb out of d0
OVERFIT_RISES = 3  # three rises in a row of a loss on fixed noise and timesteps are not chance
WEIGHT_DECAY_CHECK_AFTER = 0.10  # with weight_decay_by_lr the decay follows d: read it once d has grown

CODES = (
    "lr_not_one",
    "d_stuck",
    "d_growing_late",
    "text_encoder_d_high",
    "overfitting",
    "nonfinite_gradients",
    "weight_decay_lora",
)


class HealthMonitor:
    """Watches d, the losses and the optimizer's counters; writes each warning once."""

    def __init__(
        self, config: TrainConfig, events: Any, total_steps: int, group_names: list[str], images: int
    ) -> None:
        self.config = config
        self.events = events
        self.total_steps = total_steps
        self.group_names = group_names
        self.images = images
        self.warned: set[str] = set()
        self.losses: dict[int, float] = {}  # training loss per step
        self.d_by_step: dict[int, list[float]] = {}
        self.validations: list[tuple[int, float]] = []  # (step, loss)
        self.first_nonfinite_step: int | None = None

    # ------------------------------------------------------------------ inputs
    def at_start(self, step: int) -> None:
        """Warnings the config alone decides."""
        opt = self.config.optimizer
        if opt.lr != 1.0:
            self._warn(
                "lr_not_one",
                step,
                f"optimizer.lr = {opt.lr:g} with Prodigy: d already is the learning rate, so each step is "
                f"d × {opt.lr:g}; set lr = 1.0 and tune optimizer.d_coef instead",
                lr=opt.lr,
            )
        elif self.config.lora.train_text_encoder and opt.text_encoder_lr != 1.0:
            self._warn(
                "lr_not_one",
                step,
                f"optimizer.text_encoder_lr = {opt.text_encoder_lr:g}: the text encoders step with their d × "
                f"{opt.text_encoder_lr:g}; keep it only if you mean them to move "
                f"{'slower' if opt.text_encoder_lr < 1 else 'faster'} than Prodigy finds",
                text_encoder_lr=opt.text_encoder_lr,
            )
        if opt.weight_decay > 0 and not opt.weight_decay_by_lr:
            self._weight_decay(step, opt.weight_decay)

    def after_step(self, step: int, loss: float, optimizer: Any) -> None:
        groups = optimizer.param_groups
        report = optimizer.telemetry()
        ds = [g["d"] for g in groups]
        self.losses[step] = loss
        self.d_by_step[step] = ds
        done = step / self.total_steps
        skips = max(r["nonfinite_skips"] for r in report)
        if skips and self.first_nonfinite_step is None:
            self.first_nonfinite_step = step
        if skips:
            self._nonfinite(step, skips)
        if done >= STUCK_AFTER and step >= STUCK_MIN_STEPS:
            self._stuck(step, groups, report)
        if done >= TEXT_ENCODER_CHECK_AFTER and len(report) > 1:
            self._text_encoder_ratio(step, report)
        if done >= WEIGHT_DECAY_CHECK_AFTER:
            opt = self.config.optimizer
            if opt.weight_decay > 0 and opt.weight_decay_by_lr:
                self._weight_decay(step, opt.weight_decay * report[0]["applied_lr"])
        if done > 1 - LATE_WINDOW and not report[0]["d_frozen"]:
            self._late_growth(step, ds)

    def after_validation(self, step: int, loss: float, best_step: int | None) -> None:
        self.validations.append((step, loss))
        if len(self.validations) <= OVERFIT_RISES:
            return
        recent = self.validations[-(OVERFIT_RISES + 1) :]
        rising = all(later[1] > earlier[1] for earlier, later in zip(recent, recent[1:]))
        before = self._mean_training_loss(recent[0][0], recent[1][0])
        now = self._mean_training_loss(recent[-2][0], recent[-1][0])
        if rising and before is not None and now is not None and now < before:
            self._warn(
                "overfitting",
                step,
                f"the validation loss rose for {OVERFIT_RISES} evaluations in a row (to {loss:.4g}) while the "
                f"training loss fell ({before:.4g} → {now:.4g}): the LoRA is learning the training images "
                f"rather than the concept. The best validation loss was at step {best_step}; export that "
                f"checkpoint with `python -m trainers export RUN --best`, or train fewer steps",
                best_step=best_step,
            )

    def restore(self, events: list[dict[str, Any]]) -> None:
        """What a resumed run's kept events say: the warnings given, losses, d's, validations."""
        for event in events:
            kind = event.get("type")
            if kind == "warning" and event.get("code") in CODES:
                self.warned.add(event["code"])
            elif kind == "step":
                self.losses[event["step"]] = event["loss"]
                self.d_by_step[event["step"]] = [g["d"] for g in event["groups"]]
            elif kind == "validation":
                self.validations.append((event["step"], event["loss"]))

    # ------------------------------------------------------------------ the checks
    def _stuck(self, step: int, groups: list[dict[str, Any]], report: list[dict[str, Any]]) -> None:
        for name, group, entry in zip(self.group_names, groups, report):
            if entry["d_frozen"] or group["d"] >= STUCK_GROWTH * group["d0"]:
                continue
            if entry["state_bytes"] == 0 or group["d_denom"] == 0:
                cause = (
                    "no gradient reaches it: its LoRA targets are not used by the forward pass (check the "
                    "target modules) or are frozen"
                )
            elif self.images < FEW_IMAGES:
                cause = (
                    f"the dataset has only {self.images} images, too few for Prodigy's estimate to grow; add "
                    "images or raise optimizer.d0"
                )
            else:
                cause = (
                    f"d0 = {group['d0']:g} is too small for this model: raise optimizer.d0 (e.g. "
                    f"{group['d0'] * 10:g}) or optimizer.d_coef"
                )
            self._warn(
                "d_stuck",
                step,
                f"after {step} of {self.total_steps} steps, d of {name} is still {group['d']:.3g}, where it "
                f"started (d0 = {group['d0']:g}): {cause}",
                group=name,
                d=group["d"],
            )
            return

    def _late_growth(self, step: int, ds: list[float]) -> None:
        start = math.ceil((1 - LATE_WINDOW) * self.total_steps)
        before = self.d_by_step.get(start)
        if before is None:
            return
        for name, d_now, d_before in zip(self.group_names, ds, before):
            if d_now > LATE_GROWTH * d_before:
                self._warn(
                    "d_growing_late",
                    step,
                    f"d of {name} is still growing fast near the end of the run ({d_before:.3g} at step "
                    f"{start} → {d_now:.3g} now): it has not settled on a step size. Set "
                    'optimizer.prodigy_steps = "auto" to freeze it once it flattens, or optimizer.d_limiter = '
                    "true to slow its growth (or freeze it now: `python -m trainers control RUN freeze`)",
                    group=name,
                    growth=d_now / d_before,
                )
                return

    def _text_encoder_ratio(self, step: int, report: list[dict[str, Any]]) -> None:
        ratio_limit = self.config.health.text_encoder_d_ratio
        denoiser = report[0]["applied_lr"]
        for name, entry in zip(self.group_names[1:], report[1:]):
            ratio = entry["applied_lr"] / denoiser if denoiser > 0 else math.inf
            if ratio > ratio_limit:
                self._warn(
                    "text_encoder_d_high",
                    step,
                    f"{name} steps {ratio:.0f}× larger than {self.group_names[0]} (d·lr {entry['applied_lr']:.3g} "
                    f"against {denoiser:.3g}): the text encoder may be overwritten before the "
                    f"{self.group_names[0]} learns. Lower optimizer.text_encoder_lr (e.g. "
                    f"{self.config.optimizer.text_encoder_lr / ratio:.2g}) or set optimizer.split_groups_mean = "
                    "true to step every group with the groups' mean d",
                    group=name,
                    ratio=ratio,
                )
                return

    def _nonfinite(self, step: int, skips: int) -> None:
        self._warn(
            "nonfinite_gradients",
            step,
            f"{skips} optimizer step{'s' if skips > 1 else ''} had NaN/inf gradients and "
            f"{'were' if skips > 1 else 'was'} skipped (since step {self.first_nonfinite_step}): the weights "
            'are safe, but try training.precision = "bf16" instead of fp16, or a lower optimizer.d_coef',
            count=skips,
            since_step=self.first_nonfinite_step,
        )

    def _weight_decay(self, step: int, per_step: float) -> None:
        remaining = max(self.total_steps - step, 0)
        over_run = 1 - (1 - min(per_step, 1.0)) ** remaining
        self._warn(
            "weight_decay_lora",
            step,
            f"optimizer.weight_decay = {self.config.optimizer.weight_decay:g} with a LoRA: each step shrinks "
            f"the LoRA weights by {per_step:.3g} ({over_run:.1%} over the {remaining} remaining steps), "
            "pulling them back towards the base model; with Prodigy's large d this is rarely wise, set it to 0",
            per_step=per_step,
        )

    # ------------------------------------------------------------------ helpers
    def _mean_training_loss(self, after: int, until: int) -> float | None:
        values = [loss for step, loss in self.losses.items() if after < step <= until]
        return sum(values) / len(values) if values else None

    def _warn(self, code: str, step: int, message: str, **details: Any) -> None:
        if code in self.warned:
            return
        self.warned.add(code)
        self.events.write("warning", code=code, step=step, message=message, **details)
        tqdm.write(f"warning: {message}", file=sys.stderr)
