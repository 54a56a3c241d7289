"""Multi-tensor version of the step in `reference.py`, for the configurations most runs use.

Parameters of one group are bucketed by shape and dtype; each bucket's gradients are stacked once into an
fp32 batch, so the second-moment statistics, the normalised update, StableAdamW and Prodigy's statistics
are a handful of batched ops per bucket instead of a dozen small ops per tensor. The schedule-free update
then runs as `torch._foreach_*` over the whole group. Same math as the reference, up to float rounding.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from .reference import GroupAccumulators
from .step_scalars import StepScalars
from .tensor_math import PRODIGY_SLICE_STRIDE, RoundingNoise, factored_dims, factored_normaliser_dim

# Elements per stacked batch: small enough that the allocator reuses its buffers (fresh large
# allocations page-fault on every step) and bounds the transient fp32 copies on large models.
MAX_BATCH_ELEMENTS = 1 << 20
_UNSUPPORTED_OPTIONS = (
    "use_muon_pp",
    "use_cautious",
    "use_grams",
    "use_adopt",
    "use_speed",
    "use_orthograd",
    "use_focus",
)


def supports(group: dict[str, Any], params: list[torch.Tensor]) -> bool:
    """True where the multi-tensor step implements the group's options (the rest use the reference)."""
    if not group["use_schedulefree"] or not group["factored_fp32"]:
        return False
    if any(group[option] for option in _UNSUPPORTED_OPTIONS):
        return False
    return all(
        p.dtype == torch.float32 or (p.dtype == torch.bfloat16 and group["stochastic_rounding"])
        for p in params
    )


def _batches(params: list[torch.Tensor]) -> list[list[int]]:
    """Indices of params grouped by (shape, dtype, device), split so no batch exceeds MAX_BATCH_ELEMENTS."""
    by_kind: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        by_kind[(tuple(p.shape), p.dtype, p.grad.dtype, p.device)].append(i)
    batches = []
    for indices in by_kind.values():
        per_batch = max(1, MAX_BATCH_ELEMENTS // max(1, params[indices[0]].numel()))
        batches.extend(indices[i : i + per_batch] for i in range(0, len(indices), per_batch))
    return batches


def _unsqueeze_like(values: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (batch.dim() - 1)))


def _factored_denominator(
    g: torch.Tensor, batch: _Batch, s: StepScalars, dims: tuple[int, int], out: torch.Tensor
) -> torch.Tensor:
    """Update the batch's factored statistics from g; returns sqrt of the rank-1 estimate, in `out`."""
    shape = g.shape[1:]
    col_dim, row_dim = dims
    squares = torch.mul(g, g, out=out)
    rows, cols = batch.stacked["exp_avg_sq_row"], batch.stacked["exp_avg_sq_col"]
    for stat, dim in ((rows, row_dim), (cols, col_dim)):
        stat.lerp_(squares.sum(dim=dim + 1, keepdim=True).div_(shape[dim]), weight=1 - s.beta2)
    row_mean = rows.mean(dim=factored_normaliser_dim(col_dim, row_dim) + 1, keepdim=True).add_(1e-30)
    row_factor, col_factor = rows.div(row_mean).sqrt_(), cols.sqrt()
    if len(shape) == 2:  # the outer product as a batched matmul: much faster than a broadcast multiply
        left, right = (row_factor, col_factor) if row_dim == 1 else (col_factor, row_factor)
        return torch.bmm(left, right, out=squares)
    return torch.mul(row_factor, col_factor, out=squares)


def _normalised_update_(g: torch.Tensor, batch: _Batch, s: StepScalars, buffer: torch.Tensor) -> None:
    """Second-moment EMA for the batch and g <- g / (sqrt(v) + eps) (or Adam-atan2), in place."""
    if "exp_avg_sq_row" in batch.stacked:
        denom = _factored_denominator(g, batch, s, factored_dims(g.shape[1:], True), buffer)
    else:
        exp_avg_sq = batch.stacked["exp_avg_sq"]  # in the statistics' dtype, rounded like the reference
        exp_avg_sq.mul_(s.beta2).addcmul_(g, g, value=1 - s.beta2)
        denom = (
            torch.sqrt(exp_avg_sq, out=buffer)
            if exp_avg_sq.dtype == torch.float32
            else exp_avg_sq.sqrt().float()
        )
    if s.eps is None:
        b = s.threshold
        g.atan2_(denom.mul_(b)).mul_(1 / math.atan(1 / b))
    else:
        g.div_(denom.add_(s.eps))


def _stableadamw_(update: torch.Tensor, s: StepScalars) -> None:
    numel = update[0].numel()
    rms = torch.linalg.vector_norm(update.view(update.shape[0], -1), dim=1).div_(numel**0.5).clamp_min_(1.0)
    update.div_(_unsqueeze_like(rms.div_(s.threshold).clamp_min_(1.0), update))


# Per-parameter state that lives in one tensor per batch; each parameter's entry is a view of it.
_BATCHED_STATE = ("z", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col", "s")


class _Batch:
    """Same-shaped parameters stepped together.

    Their state tensors are moved into one stacked tensor per key, and each parameter's state entry
    becomes a view of it, so a step updates the whole batch's state with one op per key instead of
    stacking and copying back every tensor (the views stay valid in `optimizer.state`).
    """

    def __init__(self, indices: list[int], states: list[dict], prodigy_active: bool) -> None:
        self.indices = indices
        self.states = [states[i] for i in indices]
        self.stacked: dict[str, torch.Tensor] = {}
        for key in _BATCHED_STATE:
            if all(key in st for st in self.states):
                stacked = torch.stack([st[key] for st in self.states])
                for st, view in zip(self.states, stacked.unbind(0)):
                    st[key] = view
                self.stacked[key] = stacked
        self.z = [st["z"] for st in self.states]
        if prodigy_active:
            length = self.stacked["z"][0].ravel()[::PRODIGY_SLICE_STRIDE].shape[0]
            self.p0 = torch.stack([st["p0"].expand(length) for st in self.states])  # p0 never changes

    def sliced_z(self) -> torch.Tensor:
        """Every 11th element of each z, as a (batch, n) view."""
        z = self.stacked["z"]
        return z.view(z.shape[0], -1)[:, ::PRODIGY_SLICE_STRIDE]


class BatchPlan:
    """The batches of one group for each set of parameters stepped together (the whole group, or the
    buckets of the fused backward pass), kept while the parameters' state tensors stay the same.

    Building a plan moves its parameters' state into new stacked tensors, so plans that shared a
    parameter with it are dropped (their stacked tensors no longer hold that parameter's state).
    """

    def __init__(self) -> None:
        self._plans: dict[tuple, list[_Batch]] = {}
        self._members: dict[tuple, set[int]] = {}

    def batches_for(
        self, params: list[torch.Tensor], states: list[dict], prodigy_active: bool
    ) -> list[_Batch]:
        key = (prodigy_active, *(id(st["z"]) for st in states), *(id(st.get("s")) for st in states))
        batches = self._plans.get(key)
        if batches is None:
            members = {id(p) for p in params}
            for old in [k for k, m in self._members.items() if m & members]:
                del self._plans[old], self._members[old]
            batches = [_Batch(indices, states, prodigy_active) for indices in _batches(params)]
            key = (prodigy_active, *(id(st["z"]) for st in states), *(id(st.get("s")) for st in states))
            self._plans[key], self._members[key] = batches, members
        return batches


def _accumulate_prodigy(
    g: torch.Tensor, grad_dtype: torch.dtype, batch: _Batch, s: StepScalars, acc: GroupAccumulators
) -> None:
    """Prodigy's <g, p0 - z> and ||s||_1 for a batch (before g is overwritten by the update)."""
    sliced_grad = g.view(g.shape[0], -1)[:, ::PRODIGY_SLICE_STRIDE].to(grad_dtype)
    x0_minus = batch.p0 - batch.sliced_z()
    # like torch.dot in the gradient dtype: fp32 accumulation, one rounding at the end
    dots = (
        (sliced_grad.float() * x0_minus.float())
        .sum(dim=1)
        .to(torch.promote_types(grad_dtype, x0_minus.dtype))
    )
    acc.numerator.add_(dots.float().sum(), alpha=s.d_k)
    s_batch = batch.stacked["s"]
    s_batch.mul_(s.beta3).add_(sliced_grad, alpha=s.d_k)
    acc.denominator.add_(s_batch.abs().sum(dim=1).float().sum())  # per-tensor sums in s's dtype, as torch.dot


def _schedulefree_(
    ys: list[torch.Tensor], zs: list[torch.Tensor], updates: list[torch.Tensor], s: StepScalars
) -> None:
    """The reference's schedule-free update over lists of tensors (see reference.schedulefree_update_)."""
    if s.decay != 0:  # decoupled weight decay at y
        torch._foreach_add_(ys, ys, alpha=-s.decay * s.xy_step)
        torch._foreach_add_(zs, ys, alpha=-s.decay)
    torch._foreach_lerp_(ys, zs, s.ckp1)
    torch._foreach_add_(ys, updates, alpha=-s.dlr * s.xy_step)
    torch._foreach_add_(zs, updates, alpha=-s.dlr)


class Workspace:
    """Reusable fp32 buffers for the stacked batches.

    Fresh multi-megabyte allocations are returned to the OS when freed and page-fault again on every
    step, which on a CPU costs more than the arithmetic; one buffer per role, reused, avoids that.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}

    def batch(self, role: str, like: list[torch.Tensor]) -> torch.Tensor:
        """An uninitialised fp32 (len(like), *like[0].shape) view of the `role` buffer."""
        shape = (len(like), *like[0].shape)
        numel = math.prod(shape)
        key = (role, like[0].device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(max(numel, MAX_BATCH_ELEMENTS), device=like[0].device)
        return buffer[:numel].view(shape)

    def stacked(self, role: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """fp32 copies of same-shaped tensors, stacked in the `role` buffer."""
        batch = self.batch(role, tensors)
        torch._foreach_copy_(list(batch.unbind(0)), tensors)
        return batch


def step_group(
    params: list[torch.Tensor],
    group: dict[str, Any],
    states: list[dict],
    s: StepScalars,
    acc: GroupAccumulators,
    plan: BatchPlan,
    noise: RoundingNoise,
    workspace: Workspace,
) -> bool:
    """Step every parameter of `params` (all with grads and initialised state). Returns True."""
    if not s.prodigy_active:
        for st in states:
            st.pop("s", None)  # d is frozen: free what only Prodigy needed
            st.pop("p0", None)
    for batch in plan.batches_for(params, states, s.prodigy_active):
        batch_params = [params[i] for i in batch.indices]
        grads = [p.grad for p in batch_params]
        g = workspace.stacked("update", grads)
        if s.prodigy_active:
            _accumulate_prodigy(g, grads[0].dtype, batch, s, acc)
        _normalised_update_(g, batch, s, workspace.batch("denominator", grads))
        if group["use_stableadamw"]:
            _stableadamw_(g, s)

        if batch_params[0].dtype == torch.float32:  # update the weights in place
            _schedulefree_(batch_params, batch.z, list(g.unbind(0)), s)
        else:  # bf16 weights: update fp32 copies of the batch, then round stochastically
            y32 = workspace.stacked("y", batch_params)
            z32 = workspace.batch("z", batch_params).copy_(batch.stacked["z"])
            _schedulefree_([y32], [z32], [g], s)
            torch._foreach_copy_(batch_params, list(noise.round_(y32, group).unbind(0)))
            batch.stacked["z"].copy_(noise.round_(z32, group))
    return True
