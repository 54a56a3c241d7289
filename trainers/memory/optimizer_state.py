"""What ppsf_optim's ProdigyPlusScheduleFree holds for a set of trainable parameters.

The per-parameter state comes from the optimizer's own `init_state`, run on a real tensor of each distinct
LoRA shape (LoRA matrices are small, and few shapes repeat many times), with the group options the trainer
passes. The multi-tensor step adds what it keeps between steps: a stacked copy of each batch's Prodigy
start point `p0` and two reusable fp32 workspace buffers (tests/test_memory.py checks the total against a
real optimizer after a step). torch and the optimizer are imported when bytes are counted, so the estimate
reads FUSED_BUCKET_BYTES without them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainers.config import OptimizerConfig

if TYPE_CHECKING:
    import torch

FUSED_BUCKET_BYTES = 16 << 20  # attach_fused_backward's default, which the trainer uses
ACCUMULATOR_BYTES = 12  # GroupAccumulators: numerator, denominator (fp32) and a NaN/inf count (int32)


@dataclass(frozen=True)
class OptimizerBytes:
    state: int  # per-parameter state (z, second-moment statistics, Prodigy's s and p0)
    step_buffers: int  # kept by the multi-tensor step: stacked p0 copies and the workspace buffers

    @property
    def total(self) -> int:
        return self.state + self.step_buffers


def optimizer_bytes(
    params: list[torch.Tensor], options: OptimizerConfig, zero_init: list[bool], groups: int = 1
) -> OptimizerBytes:
    """Bytes ppsf_optim holds for `params` (any device, meta included) after its first step, while Prodigy
    still adapts d (freezing d frees `s` and `p0`). `zero_init[i]` says params[i] starts at zero (LoRA B)."""
    import torch

    from ppsf_optim import multi_tensor
    from ppsf_optim.reference import init_state
    from ppsf_optim.tensor_math import RoundingNoise, prodigy_slice

    kinds = Counter((tuple(p.shape), p.dtype, zero) for p, zero in zip(params, zero_init))
    group = _group_options(options)
    state = stacked_p0 = 0
    largest = 0
    for (shape, dtype, zero), count in kinds.items():
        real = (torch.zeros if zero else torch.ones)(shape, dtype=dtype)
        entries = init_state(real, group)
        state += count * sum(v.numel() * v.element_size() for v in entries.values() if torch.is_tensor(v))
        if multi_tensor.supports(group, [real]) and "p0" in entries:
            stacked_p0 += count * prodigy_slice(real).numel() * entries["p0"].element_size()
        largest = max(largest, real.numel())
    buffers = 0
    if params and multi_tensor.supports(group, [torch.empty(0, dtype=params[0].dtype)]):
        roles = 2 if params[0].dtype == torch.float32 else 4  # bf16 weights also stage y and z in fp32
        buffers = roles * 4 * max(largest, multi_tensor.MAX_BATCH_ELEMENTS)
        if params[0].dtype != torch.float32:  # stochastic rounding's noise pool (int32, doubled)
            buffers += 2 * RoundingNoise.POOL_SIZE * 4
    d_groups = groups if options.split_groups else 1
    accumulators = d_groups * ACCUMULATOR_BYTES  # Prodigy's per-step sums, kept on the device
    return OptimizerBytes(state=state, step_buffers=stacked_p0 + buffers + accumulators)


def _group_options(options: OptimizerConfig) -> dict:
    """A param group's options exactly as the trainer's optimizer would hold them."""
    import torch

    from ppsf_optim import ProdigyPlusScheduleFree

    kwargs = options.optimizer_kwargs()
    kwargs["fused_back_pass"] = False
    kwargs["prodigy_steps"] = 0
    return ProdigyPlusScheduleFree([torch.zeros(1)], **kwargs).param_groups[0]
