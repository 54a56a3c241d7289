"""Parameter sets and gradient streams shared by the optimizer tests."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

# Shapes covering every code path: Linear with out > in and in > out, a conv weight, 1-D bias and norm
# weights, a LoRA pair whose up matrix starts at zero, a tiny matrix (never factored).
SHAPES = {
    "linear_in_gt_out": (40, 72),
    "linear_out_gt_in": (72, 40),
    "conv": (48, 8, 3, 3),
    "bias": (40,),
    "norm": (72,),
    "lora_down": (4, 96),
    "lora_up": (96, 4),
    "tiny": (5, 3),
}
INTERMITTENT = "conv"  # gets no gradient every third step (not the last of its group, see 1.8.33 note)


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in SHAPES.items():
        value = torch.randn(shape, generator=generator) * 0.1
        if name == "lora_up":
            value.zero_()
        if name == "norm":
            value += 1.0
        params[name] = torch.nn.Parameter(value.to(dtype))
    return params


def param_groups(params: dict[str, torch.nn.Parameter], groups: int) -> list:
    """One group, or two groups with different lr (the second like a text encoder)."""
    values = list(params.values())
    if groups == 1:
        return values
    return [{"params": values[:4], "lr": 1.0}, {"params": values[4:], "lr": 0.5}]


def gradient_stream(params: dict[str, torch.nn.Parameter], seed: int = 1) -> Callable[[int], None]:
    """Sets .grad for step t: noise plus a pull toward zero, so Prodigy sees progress and d grows."""
    generator = torch.Generator().manual_seed(seed)

    def set_grads(t: int) -> None:
        for name, p in params.items():
            noise = torch.randn(p.shape, generator=generator)
            if name == INTERMITTENT and t % 3 == 1:
                p.grad = None
                continue
            p.grad = (noise + 3.0 * p.detach().float()).to(p.dtype)

    return set_grads


def run_trajectory(factory, groups: int = 1, steps: int = 25, dtype=torch.float32, eval_every: int = 0):
    """Train `steps` steps; returns per-step d lists, final train-mode weights and eval-mode weights."""
    torch.manual_seed(1234)
    params = make_params(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = factory(param_groups(params, groups))
    set_grads = gradient_stream(params)
    ds = []
    for t in range(steps):
        set_grads(t)
        optimizer.step()
        ds.append([g["d"] for g in optimizer.param_groups])
        if eval_every and t % eval_every == 0:
            optimizer.eval()
            optimizer.train()
    train_weights = {k: p.detach().clone() for k, p in params.items()}
    optimizer.eval()
    eval_weights = {k: p.detach().clone() for k, p in params.items()}
    return ds, train_weights, eval_weights, optimizer
