"""Small tensor helpers shared by the per-tensor reference step and the multi-tensor step."""

from __future__ import annotations

import sys
from typing import Any

import torch

# Prodigy's statistics use every 11th element of a flattened tensor (Prodigy PR #22).
PRODIGY_SLICE_STRIDE = 11
# Adafactor factors the second moment only when some dimension is at least this big.
MIN_DIM_SIZE_TO_FACTOR = 32


def prodigy_slice(tensor: torch.Tensor) -> torch.Tensor:
    """Every 11th element of the flattened tensor: the sample Prodigy's d estimate is computed on."""
    return tensor.ravel()[::PRODIGY_SLICE_STRIDE]


def prodigy_slice_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Prodigy's p0 and s are kept in 16 bits: bf16 for fp32 weights, the weight dtype otherwise."""
    return torch.bfloat16 if param_dtype == torch.float32 else param_dtype


def factored_dims(shape: torch.Size | tuple[int, ...], factored: bool) -> tuple[int, int] | None:
    """The (column, row) axes of an Adafactor-style factored second moment, or None for a full one.

    The row statistic reduces the largest axis, the column statistic the second largest; on ties the later
    axis counts as larger. Tensors with fewer than 2 dims, or with every dim below 32, are not factored.
    """
    if not factored or len(shape) < 2 or all(dim < MIN_DIM_SIZE_TO_FACTOR for dim in shape):
        return None
    sorted_dims = sorted((size, index) for index, size in enumerate(shape))
    return sorted_dims[-2][1], sorted_dims[-1][1]


def factored_normaliser_dim(col_dim: int, row_dim: int) -> int:
    """Axis of the row statistic that release 1.8.33 averages to normalise the rank-1 estimate.

    This mirrors 1.8.33 exactly (and timm's adafactor_bv it came from): the formula assumes the reduced axis
    was dropped, but it is kept, so when the column axis comes after the row axis the mean is taken over an
    axis of size 1 and the estimate falls back to the column statistic alone.
    """
    return col_dim - 1 if col_dim > row_dim else col_dim


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator) -> None:
    """Copy fp32 `source` into bf16 `target`, rounding up with probability equal to the dropped fraction.

    Adding a uniform random 16-bit integer to the fp32 bits and truncating the low 16 bits rounds to one of
    the two neighbouring bf16 values with the right probabilities, so the result is unbiased on average.
    """
    noise = torch.empty_like(source, dtype=torch.int32).random_(0, 1 << 16, generator=generator)
    noise.add_(source.view(dtype=torch.int32))
    noise.bitwise_and_(-65536)  # keep the upper 16 bits: 0xFFFF0000 as a signed int32
    target.copy_(noise.view(dtype=torch.float32))


_MASK_64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """SplitMix64's step and output mix (Steele, Lea and Flood 2014): a bijective, well-mixed 64-bit hash."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK_64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return z ^ (z >> 31)


def noise_key(seed: int, step: int, draw: int) -> int:
    """The 64-bit key of a step's `draw`-th noise draw: a counter-based random stream, so the noise of any
    step follows from (seed, step) alone and a resumed optimizer needs no generator state."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _MASK_64) ^ step) ^ draw)


class RoundingNoise:
    """Uniform 16-bit noise for stochastic rounding, reproducible from what `state_dict()` keeps.

    Each draw is keyed by its group's `rounding_seed`, the group's step counter `k` and the draw's index
    within the optimizer step (`end_step()` resets it), so a loaded optimizer draws exactly the noise the
    uninterrupted run would have drawn, and torch's global RNG is neither used nor advanced.

    The multi-tensor step needs noise faster than a random generator makes it (about 4 ns per element on
    a CPU, more than the rest of the step), so a pool holding every 16-bit value exactly 16 times, in a
    fixed random order, is made once per device, and each tensor reads a window of it at an offset taken
    from its key. Every element's noise is then exactly uniform over [0, 2^16) from step to step, which is
    what makes the rounding unbiased. The per-tensor step draws fresh noise from a generator seeded with
    the key (`copy_stochastic_`).
    """

    POOL_BITS = 20
    POOL_SIZE = 1 << POOL_BITS
    POOL_SEED = 0x9E3779B9  # any constant: the offsets carry the randomness

    def __init__(self) -> None:
        self._pools: dict[torch.device, torch.Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._draws = 0  # noise draws so far in this optimizer step

    def end_step(self) -> None:
        self._draws = 0

    def _next_key(self, group: dict[str, Any]) -> int:
        key = noise_key(group["rounding_seed"], group["k"], self._draws)
        self._draws += 1
        return key

    def window(self, numel: int, device: torch.device, group: dict[str, Any]) -> torch.Tensor:
        """`numel` values of the pool from the next draw's offset (no host sync: the key is a Python int)."""
        pool = self._pools.get(device)
        if pool is None:
            order = torch.randperm(self.POOL_SIZE, generator=torch.Generator().manual_seed(self.POOL_SEED))
            pool = (order.to(torch.int32) % (1 << 16)).to(device)
            pool = self._pools[device] = torch.cat([pool, pool])
        offset = self._next_key(group) >> (64 - self.POOL_BITS)  # the key's top bits: uniform
        if numel <= self.POOL_SIZE:
            return pool[offset : offset + numel]
        repeats = -(-(numel + offset) // self.POOL_SIZE)
        return pool[: self.POOL_SIZE].repeat(repeats)[offset : offset + numel]

    def round_(self, work: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """fp32 `work` rounded stochastically to bf16; returns a bf16 view into `work`'s memory.

        After the noise is added, the upper 16 bits of each fp32 value are the rounded bf16 value, so
        they are read in place instead of masking the lower bits and converting.
        """
        bits = work.view(dtype=torch.int32)
        bits.add_(self.window(work.numel(), work.device, group).view(work.shape))
        halves = bits.view(dtype=torch.int16).view(*work.shape[:-1], work.shape[-1], 2)
        upper = 1 if sys.byteorder == "little" else 0
        return halves[..., upper].view(dtype=torch.bfloat16)

    def copy_stochastic_(self, target: torch.Tensor, source: torch.Tensor, group: dict[str, Any]) -> None:
        """`copy_stochastic_` with fresh noise from a generator seeded with the next draw's key."""
        generator = self._generators.get(source.device)
        if generator is None:
            generator = self._generators[source.device] = torch.Generator(source.device)
        copy_stochastic_(target, source, generator.manual_seed(self._next_key(group)))


def write_back(
    target: torch.Tensor, source: torch.Tensor, group: dict[str, Any], noise: RoundingNoise
) -> None:
    """Store an fp32 working copy back into its (possibly bf16) home tensor."""
    if target is source:
        return
    if group["stochastic_rounding"] and target.dtype == torch.bfloat16 and source.dtype == torch.float32:
        noise.copy_stochastic_(target, source, group)
    else:
        target.copy_(source)


def rms(tensor: torch.Tensor, floor: float) -> torch.Tensor:
    """Root mean square of all elements, clamped from below."""
    return tensor.norm().div(tensor.numel() ** 0.5).clamp_min(floor)


def clip_threshold(k: int) -> float:
    """StableAdamW / Adam-atan2 threshold: starts at 8 and decays to 1 (release 1.8.33's schedule)."""
    return max(1.0, 8 * (0.99 ** (k - 1)))


def newton_schulz_orthogonalise(grad: torch.Tensor, steps: int = 6, eps: float = 1e-7) -> torch.Tensor:
    """Muon's quintic Newton-Schulz orthogonalisation, scaled by the gradient's alignment (adaptive Muon).

    Tensors with more than 2 dims (conv weights) are flattened to (out, rest) first and reshaped back.
    Release 1.8.33 fails on those; for 2-D tensors the result is the same.
    """
    matrix = grad.reshape(grad.shape[0], -1)
    x = matrix.to(dtype=torch.bfloat16, copy=True)
    transposed = matrix.shape[0] > matrix.shape[1]
    if transposed:
        x = x.T
    x /= x.norm().add(eps)  # top singular value <= 1
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.T
    # adaptive Muon (leloykun/adaptive-muon): scale by <G, X>, clamped to [-1, 1]
    x = torch.einsum("ij,ij->", matrix.type_as(x), x).clamp(-1.0, 1.0) * x
    return x.reshape(grad.shape).to(grad.dtype)
