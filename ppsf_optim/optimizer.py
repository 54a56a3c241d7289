"""ProdigyPlusScheduleFree: Prodigy's learning-rate estimate with schedule-free iterate averaging."""

from __future__ import annotations

import copy
import statistics
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import multi_tensor
from .reference import GroupAccumulators, init_state, step_param_reference
from .step_scalars import StepScalars, is_frozen, next_d, next_d_speed, step_scalars
from .tensor_math import RoundingNoise

OPTIMISER_VERSION = (1, 8, 33)  # the public release whose behaviour this reproduces


class ProdigyPlusScheduleFree(torch.optim.Optimizer):
    r"""Prodigy + ScheduleFree, a drop-in for the public ``prodigy-plus-schedule-free`` 1.8.33 package.

    Prodigy estimates the step size ``d`` (so ``lr`` stays 1.0) and schedule-free averaging removes the
    schedule. During training the parameters hold the gradient point y; call ``optimizer.eval()`` before
    evaluating, sampling or saving (parameters become the averaged x) and ``optimizer.train()`` after.

    Arguments are those of release 1.8.33, with the same defaults and, in float32, the same trajectory:
    lr, betas, beta3, weight_decay, weight_decay_by_lr, use_bias_correction, d0, d_coef, prodigy_steps, eps
    (None selects Adam-atan2), split_groups, split_groups_mean, factored, fused_back_pass, use_stableadamw,
    use_muon_pp, use_cautious, use_grams, use_adopt, stochastic_rounding.

    Options of later releases, off by default so the defaults above keep their meaning:
      - factored_fp32 (True): keep factored second-moment statistics in fp32 (False: the weight dtype).
      - use_speed: SPEED's d rule (relative growth of a momentum of <g, p0 - z>), no ``s`` buffer.
      - use_orthograd: remove the update's component along the weights, keeping its norm.
      - use_focus: FOCUS sign update pulled toward an EMA of the weights; needs ``factored=False``.
      - d_limiter: d grows at most 2^0.25 per step.
      - schedulefree_c: refined schedule-free averaging strength C (0 = off).
      - use_schedulefree (True): False gives plain Prodigy-Adam with a first moment (use an external
        decaying schedule with it).

    Where this differs from 1.8.33:
      - ``use_muon_pp`` with conv (4-D) weights flattens them to (out, in*kh*kw) and orthogonalises; 1.8.33
        raises there.
      - A parameter without a gradient in a step never stalls the step or skews d: the step ends when
        ``step()`` finishes, or, with the fused backward pass, when the backward pass ends. 1.8.33 counts
        calls, and forgets a group's averaging weight when its last parameter had no gradient.
      - ``step()`` in eval mode raises ``RuntimeError`` and changes nothing.
      - A NaN or inf gradient skips the step (fused: that parameter and the step's d update), warns, and
        is counted in ``telemetry()``.
      - ``load_state_dict`` keeps the dtypes of the saved statistics (torch casts them to the weights').
      - Stochastic rounding's noise follows from ``param_groups[i]["rounding_seed"]`` (``torch.initial_seed()``
        at construction) and the step count, not from torch's global RNG, so a run resumed from
        ``state_dict()`` rounds exactly as the uninterrupted one.

    ``param_groups[i]["d"]`` is the group's d and ``["effective_lr"]`` the lr multiplier actually applied,
    so ``d * effective_lr`` is the applied learning rate, as trainers log it. ``telemetry()`` has more.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.99),
        beta3: float | None = None,
        weight_decay: float = 0.0,
        weight_decay_by_lr: bool = True,
        use_bias_correction: bool = False,
        d0: float = 1e-6,
        d_coef: float = 1.0,
        prodigy_steps: int = 0,
        eps: float | None = 1e-8,
        split_groups: bool = True,
        split_groups_mean: bool = True,
        factored: bool = True,
        fused_back_pass: bool = False,
        use_stableadamw: bool = True,
        use_muon_pp: bool = False,
        use_cautious: bool = False,
        use_grams: bool = False,
        use_adopt: bool = False,
        stochastic_rounding: bool = True,
        *,
        factored_fp32: bool = True,
        use_speed: bool = False,
        use_orthograd: bool = False,
        use_focus: bool = False,
        d_limiter: bool = False,
        schedulefree_c: float = 0.0,
        use_schedulefree: bool = True,
    ) -> None:
        _validate_arguments(lr, betas, beta3, weight_decay, d0, d_coef, prodigy_steps, eps, schedulefree_c)
        if use_focus and factored:
            raise ValueError("use_focus needs factored=False: FOCUS keeps a full-size EMA of the weights.")
        if eps is None and use_stableadamw:
            warnings.warn(
                "eps=None selects Adam-atan2, which bounds updates itself: use_stableadamw is off.",
                stacklevel=2,
            )
            use_stableadamw = False
        if use_cautious and use_grams:
            warnings.warn("use_cautious and use_grams exclude each other: use_grams is off.", stacklevel=2)
            use_grams = False
        if use_speed and weight_decay > 0:
            warnings.warn(
                "use_speed with weight_decay > 0 has been seen to make d explode; watch d.", stacklevel=2
            )
        if lr < 0.1:
            warnings.warn(
                f"lr={lr}: Prodigy estimates the step size itself and lr only multiplies it; "
                "keep lr=1.0 unless training is unstable.",
                stacklevel=2,
            )

        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            beta3=betas[1] ** 0.5 if beta3 is None else beta3,
            eps=eps,
            weight_decay=weight_decay,
            weight_decay_by_lr=weight_decay_by_lr,
            d=d0,
            d_prev=d0,
            d0=d0,
            d_coef=d_coef,
            k=1,
            train_mode=True,
            weight_sum=0.0,
            prodigy_steps=prodigy_steps,
            use_bias_correction=use_bias_correction,
            d_numerator=0.0,
            d_denom=0.0,
            max_d_numerator=0.0,
            shared_d=None,
            effective_lr=lr,
            nonfinite_skips=0,
            factored=factored,
            factored_fp32=factored_fp32,
            use_stableadamw=use_stableadamw,
            use_muon_pp=use_muon_pp,
            use_cautious=use_cautious,
            use_grams=use_grams,
            use_adopt=use_adopt,
            use_speed=use_speed,
            use_orthograd=use_orthograd,
            use_focus=use_focus,
            d_limiter=d_limiter,
            schedulefree_c=schedulefree_c,
            use_schedulefree=use_schedulefree,
            stochastic_rounding=stochastic_rounding,
            # the noise of every rounding follows from this and the step count k (see RoundingNoise), so a
            # loaded state_dict rounds as the uninterrupted run would; torch.initial_seed() leaves the
            # global RNG's stream untouched
            rounding_seed=torch.initial_seed(),
            optimiser_version=OPTIMISER_VERSION,
        )
        super().__init__(params, defaults)
        self.d0 = d0
        # one group has nothing to split; 1.8.33 silently does the same
        self.split_groups = split_groups and len(self.param_groups) > 1
        self.split_groups_mean = split_groups_mean
        self.fused_back_pass = fused_back_pass
        self._accumulators: dict[int, GroupAccumulators] = {}
        self._open_scalars: list[StepScalars] | None = None  # set while a fused step is in progress
        self._stepped_params: set[int] = set()
        self._updated_groups: set[int] = set()
        self._callback_queued = False
        self._rounding_noise = RoundingNoise()
        self._workspace = multi_tensor.Workspace()
        self._batch_plans: dict[int, multi_tensor.BatchPlan] = {}
        self._group_of_param: dict[int, int] = {}
        self._pending: list[torch.Tensor] = []  # fused pass: parameters whose gradients wait in the bucket
        self._pending_ids: set[int] = set()
        self._pending_bytes = 0
        self._bucket_bytes = 16 << 20

    # ------------------------------------------------------------------ train / eval
    @torch.no_grad()
    def train(self) -> None:
        """Parameters back to the gradient point y = (1 - beta1) z + beta1 x, for training."""
        self._finish_open_step()
        self._move_between_points(to_train=True)

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters to the averaged point x, for evaluation, sampling and saving."""
        self._finish_open_step()
        self._move_between_points(to_train=False)

    def _move_between_points(self, to_train: bool) -> None:
        for group in self.param_groups:
            if not group["use_schedulefree"] or group["train_mode"] == to_train:
                continue
            beta1 = group["betas"][0]
            # x -> y is y = x + (1 - beta1)(z - x); y -> x is its inverse, x = y + (1 - 1/beta1)(z - y)
            weight = 1 - beta1 if to_train else 1 - 1 / beta1
            for p in group["params"]:
                z = self.state[p].get("z")
                if z is None:
                    continue
                if p.dtype == torch.float32:
                    p.lerp_(z.to(device=p.device), weight)
                else:  # lerp in fp32 so a bf16 round trip adds no more than one rounding
                    p.copy_(p.float().lerp_(z.to(device=p.device, dtype=torch.float32), weight))
            group["train_mode"] = to_train

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One optimizer step from the parameters' `.grad`. With the fused backward pass this only ends a
        step that `step_param` calls left open (a no-op otherwise)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.fused_back_pass:
            self._finish_open_step()
            return loss
        self._check_train_mode()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return loss
        if not all(_finite_flags([p.grad for p in params])):
            self._skip_nonfinite_step()
            return loss

        shared_d = self._shared_d()
        all_scalars = [step_scalars(g, shared_d) for g in self.param_groups]
        self._step_with_grads(params, all_scalars)
        self._end_step(all_scalars)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Step one parameter now (fused backward pass). Called from a gradient hook during backward, the
        step ends by itself when the backward pass does; otherwise call `step()` (or `end_step()`) once all
        parameters of the step are done."""
        self._check_train_mode(self.param_groups[self._group_index_of(p)])
        if id(p) in self._stepped_params:  # p's second gradient: the previous step is over
            self._finish_open_step()
        self._open_step()
        if p.grad is not None:
            index = self._group_index_of(p)
            group = self.param_groups[index]  # the live group: load_state_dict replaces the group dicts
            if not self.state[p]:
                self.state[p].update(init_state(p, group))
            acc = self._accumulator_for(index, p.device)
            ok = torch.isfinite(p.grad).all()
            acc.nonfinite.add_(~ok)
            scalars = self._open_scalars[index]
            if step_param_reference(p, group, self.state[p], scalars, acc, self._rounding_noise, ok):
                self._updated_groups.add(index)
        self._stepped_params.add(id(p))
        self._queue_end_of_backward()

    def step_parameter(self, p: torch.Tensor, group: dict[str, Any], i: int) -> None:
        """OneTrainer's name for `step_param`."""
        self.step_param(p, group)

    def _step_with_grads(self, params: list[torch.Tensor], scalars: list[StepScalars]) -> None:
        """Step parameters with finite gradients, group by group: multi-tensor where the options allow."""
        by_group: dict[int, list[torch.Tensor]] = {}
        for p in params:
            by_group.setdefault(self._group_index_of(p), []).append(p)
        for index, group_params in by_group.items():
            group = self.param_groups[index]
            acc = self._accumulator_for(index, group_params[0].device)
            for p in group_params:
                if not self.state[p]:
                    self.state[p].update(init_state(p, group))
            states = [self.state[p] for p in group_params]
            if multi_tensor.supports(group, group_params):
                plan = self._batch_plans.setdefault(index, multi_tensor.BatchPlan())
                updated = multi_tensor.step_group(
                    group_params,
                    group,
                    states,
                    scalars[index],
                    acc,
                    plan,
                    self._rounding_noise,
                    self._workspace,
                )
            else:
                updated = False
                for p, state in zip(group_params, states):
                    updated |= step_param_reference(
                        p, group, state, scalars[index], acc, self._rounding_noise
                    )
            if updated:
                self._updated_groups.add(index)

    def _fused_hook(self, p: torch.Tensor) -> None:
        """A gradient is complete: queue it, and step the queue once it holds `bucket_bytes` of gradients."""
        if id(p) in self._stepped_params or id(p) in self._pending_ids:  # a new step has begun
            self._finish_open_step()
        self._pending.append(p)
        self._pending_ids.add(id(p))
        self._pending_bytes += p.grad.numel() * p.grad.element_size()
        if self._pending_bytes >= self._bucket_bytes:
            self._flush_pending()
        self._queue_end_of_backward()

    def _flush_pending(self) -> None:
        """Step the queued parameters together and free their gradients (one host sync for NaN/inf)."""
        params, self._pending, self._pending_ids, self._pending_bytes = self._pending, [], set(), 0
        if not params:
            return
        self.step_params(params)
        for p in params:
            p.grad = None

    @torch.no_grad()
    def step_params(self, params: list[torch.Tensor]) -> None:
        """Step `params` together now from their `.grad`, inside the open step (opened if none), leaving
        the gradients in place; `end_step()` ends the step. The fused backward pass steps its buckets with
        this, and so does the DDP communication hook of `ppsf_optim.ddp` once a bucket is all-reduced.
        Parameters without a gradient are left alone; a NaN/inf gradient skips its parameter and the step's
        d update, as in the fused pass."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        self._check_train_mode()
        self._open_step()
        finite = _finite_flags([p.grad for p in params])
        for p, ok in zip(params, finite):
            if not ok:
                self._accumulator_for(self._group_index_of(p), p.device).nonfinite.add_(1)
        self._step_with_grads([p for p, ok in zip(params, finite) if ok], self._open_scalars)
        self._stepped_params.update(id(p) for p in params)

    def _open_step(self) -> None:
        if self._open_scalars is None:
            shared_d = self._shared_d()
            self._open_scalars = [step_scalars(g, shared_d) for g in self.param_groups]

    def _queue_end_of_backward(self) -> None:
        if not self._callback_queued and torch._C._current_graph_task_id() != -1:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_open_step)
            self._callback_queued = True

    def _group_index_of(self, p: torch.Tensor) -> int:
        """Index of the group holding `p` (by identity), cached until the groups change."""
        index = self._group_of_param.get(id(p))
        if index is None:
            self._group_of_param = {id(q): i for i, g in enumerate(self.param_groups) for q in g["params"]}
            index = self._group_of_param.get(id(p))
            if index is None:
                raise ValueError("step_param got a parameter that is not in this optimizer")
        return index

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._group_of_param = {}

    def supports_fused_back_pass(self) -> bool:
        return True

    def end_step(self) -> None:
        """End a step made of `step_param` calls outside a backward pass."""
        self._finish_open_step()

    def attach_fused_backward(self, bucket_bytes: int = 16 << 20) -> FusedBackward:
        """Step parameters during backward as their gradients complete, and free those gradients.

        Registers post-accumulate-grad hooks. Completed gradients are queued and stepped together (with
        the multi-tensor step) once `bucket_bytes` of them are waiting, so a gradient at least that big is
        stepped and freed at once, and at most about `bucket_bytes` of gradients are alive at any time.
        Each backward pass is one optimizer step, ended when the backward pass ends. Gradient
        accumulation cannot work this way. Returns a handle whose `remove()` restores ordinary `step()`.
        """
        self.fused_back_pass = True
        self._bucket_bytes = bucket_bytes
        handles = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    handles.append(p.register_post_accumulate_grad_hook(self._fused_hook))
        return FusedBackward(self, handles)

    def freeze_d(self) -> None:
        """Freeze d from the next step on, as if `prodigy_steps` had been set to the current step."""
        self._finish_open_step()
        for group in self.param_groups:
            if not is_frozen(group):
                group["prodigy_steps"] = group["k"]

    # ------------------------------------------------------------------ end of step
    def _finish_open_step(self) -> None:
        self._callback_queued = False
        self._flush_pending()
        if self._open_scalars is not None:
            scalars, self._open_scalars = self._open_scalars, None
            self._end_step(scalars)

    def _end_step(self, scalars: list[StepScalars]) -> None:
        """Group-level work once per step: Prodigy's d, the schedule-free weight sum, the step counter."""
        self._stepped_params.clear()
        self._rounding_noise.end_step()
        d_groups = range(len(self.param_groups)) if self.split_groups else [0]
        sums = self._read_accumulators(d_groups)
        for index in d_groups:
            group = self.param_groups[index]
            numerator, denominator, nonfinite = sums[index]
            if nonfinite:
                group["nonfinite_skips"] += 1
                warnings.warn(
                    f"param group {index}: a gradient had NaN/inf; those parameters and this step's d update "
                    "were skipped. Lower the learning rate (d_coef) or check the loss and the data.",
                    stacklevel=3,
                )
            elif not is_frozen(group):
                self._update_d(group, numerator, denominator)
        if not self.split_groups:
            first = self.param_groups[0]
            for group in self.param_groups[1:]:
                for key in ("d", "d_prev", "d_numerator", "d_denom", "max_d_numerator"):
                    group[key] = first[key]
        for index, group in enumerate(self.param_groups):
            if index in self._updated_groups:
                group["weight_sum"] = scalars[index].weight_sum
            group["k"] += 1
        self._updated_groups.clear()
        shared_d = statistics.harmonic_mean([g["d"] for g in self.param_groups])
        for group in self.param_groups:
            if self.split_groups and self.split_groups_mean:
                group["shared_d"] = shared_d
            group["effective_lr"] = (self._shared_d() or group["d"]) * group["lr"] / group["d"]

    def _update_d(self, group: dict[str, Any], numerator: float, denominator: float) -> None:
        if group["use_speed"]:
            d, group["d_numerator"] = next_d_speed(group, numerator)
        else:
            d, group["d_numerator"] = next_d(group, numerator, denominator)
        group["max_d_numerator"] = max(group["max_d_numerator"], group["d_numerator"])
        group["d_prev"], group["d"], group["d_denom"] = group["d"], d, denominator

    def _read_accumulators(self, d_groups: Iterable[int]) -> dict[int, tuple[float, float, int]]:
        """Per d-group (numerator, denominator, nonfinite count), with one host sync, and reset them."""
        accs = {i: self._accumulators[i] for i in d_groups if i in self._accumulators}
        if not accs:
            return {i: (0.0, 0.0, 0) for i in d_groups}
        device = next(iter(accs.values())).numerator.device
        values = torch.stack(
            [v.to(device) for a in accs.values() for v in (a.numerator, a.denominator, a.nonfinite.float())]
        ).tolist()
        sums = {i: (0.0, 0.0, 0) for i in d_groups}
        for n, (i, acc) in enumerate(accs.items()):
            sums[i] = (values[3 * n], values[3 * n + 1], int(values[3 * n + 2]))
            for tensor in (acc.numerator, acc.denominator, acc.nonfinite):
                tensor.zero_()
        return sums

    def _skip_nonfinite_step(self) -> None:
        for group in self.param_groups:
            group["nonfinite_skips"] += 1
        warnings.warn(
            "a gradient had NaN/inf: this step was skipped (weights, statistics and d unchanged). "
            "Lower the learning rate (d_coef) or check the loss and the data.",
            stacklevel=3,
        )

    # ------------------------------------------------------------------ helpers
    def _shared_d(self) -> float | None:
        if self.split_groups and self.split_groups_mean:
            return self.param_groups[0]["shared_d"]
        return None

    def _accumulator_for(self, group_index: int, device: torch.device) -> GroupAccumulators:
        index = group_index if self.split_groups else 0
        if index not in self._accumulators:
            self._accumulators[index] = GroupAccumulators(device)
        return self._accumulators[index].to(device)

    def _check_train_mode(self, group: dict[str, Any] | None = None) -> None:
        for g in [group] if group is not None else self.param_groups:
            if g["use_schedulefree"] and not g["train_mode"]:
                raise RuntimeError(
                    # "Not in train mode!" is the public release's message: code that matches on it works
                    "Not in train mode! The optimizer is in eval mode (parameters hold the averaged weights). Call "
                    "optimizer.train() before training steps, and optimizer.eval() before evaluation/saving."
                )

    # ------------------------------------------------------------------ reporting
    def telemetry(self) -> list[dict[str, Any]]:
        """Per group: d, applied learning rate, frozen state, step count, state bytes, skipped steps."""
        self._finish_open_step()
        shared_d = self._shared_d()
        report = []
        for group in self.param_groups:
            frozen = is_frozen(group)
            report.append(
                {
                    "d": group["d"],
                    "applied_lr": (shared_d or group["d"]) * group["lr"],
                    "effective_lr": group["effective_lr"],
                    "d_frozen": frozen,
                    "d_frozen_since_step": group["prodigy_steps"] if frozen else None,
                    "step": group["k"] - 1,
                    "state_bytes": sum(_state_bytes(self.state[p]) for p in group["params"]),
                    "params": sum(p.numel() for p in group["params"]),
                    "nonfinite_skips": group["nonfinite_skips"],
                    "train_mode": group["train_mode"],
                }
            )
        return report

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        self._finish_open_step()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping each saved statistic's dtype (torch would cast it to the parameter's)."""
        self._finish_open_step()
        saved_dtypes = {
            (param_id, key): value.dtype
            for param_id, param_state in state_dict["state"].items()
            for key, value in param_state.items()
            if torch.is_tensor(value)
        }
        super().load_state_dict(copy.copy(state_dict))
        for group in self.param_groups:  # state_dicts saved before the seed existed
            group.setdefault("rounding_seed", self.defaults["rounding_seed"])
        self._group_of_param = {}
        self._batch_plans.clear()  # they hold the replaced state tensors
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for param_id, p in zip(saved_ids, params):
            for key, value in self.state.get(p, {}).items():
                dtype = saved_dtypes.get((param_id, key))
                if torch.is_tensor(value) and dtype is not None and value.dtype != dtype:
                    self.state[p][key] = state_dict["state"][param_id][key].to(device=p.device, dtype=dtype)
        self._accumulators.clear()


class FusedBackward:
    """Handle of `attach_fused_backward()`: `remove()` detaches the hooks and restores `step()`."""

    def __init__(self, optimizer: ProdigyPlusScheduleFree, handles: list[Any]) -> None:
        self.optimizer, self.handles = optimizer, handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.optimizer._finish_open_step()
        self.optimizer.fused_back_pass = False


def _validate_arguments(
    lr, betas, beta3, weight_decay, d0, d_coef, prodigy_steps, eps, schedulefree_c
) -> None:
    checks = [
        (lr > 0, f"lr must be > 0, got {lr}"),
        (len(betas) == 2, f"betas must be a pair (beta1, beta2), got {betas}"),
        (all(0.0 <= b < 1.0 for b in betas), f"betas must each be in [0, 1), got {tuple(betas)}"),
        (beta3 is None or 0.0 <= beta3 < 1.0, f"beta3 must be None or in [0, 1), got {beta3}"),
        (weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}"),
        (d0 > 0, f"d0 must be > 0, got {d0}"),
        (d_coef > 0, f"d_coef must be > 0, got {d_coef}"),
        (prodigy_steps >= 0, f"prodigy_steps must be >= 0 (0 = never freeze d), got {prodigy_steps}"),
        (eps is None or eps > 0, f"eps must be > 0, or None for Adam-atan2, got {eps}"),
        (schedulefree_c >= 0, f"schedulefree_c must be >= 0 (0 = off), got {schedulefree_c}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _finite_flags(grads: list[torch.Tensor]) -> list[bool]:
    """Per gradient, whether it is free of NaN/inf, with one host sync."""
    norms = torch._foreach_norm(grads)  # NaN/inf propagate; only |g| > 1e19 overflows to a false alarm
    return torch.stack([n.to(grads[0].device) for n in norms]).isfinite().tolist()


def _state_bytes(state: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
