"""The order of training samples: same-bucket batches, reshuffled every epoch from the run's seed.

The order of epoch e depends only on (seed, e), so a resumed run can rebuild it and skip to its position.
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict


def epoch_batches(
    buckets: list[tuple[int, int]], repeats: list[int], batch_size: int, seed: int, epoch: int
) -> list[list[int]]:
    """Batches of item indices for one epoch: each item `repeats` times, batches never mix buckets."""
    rng = random.Random(seed * 1_000_003 + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (bucket, count) in enumerate(zip(buckets, repeats)):
        by_bucket[bucket].extend([index] * count)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        batches.extend(indices[i : i + batch_size] for i in range(0, len(indices), batch_size))
    rng.shuffle(batches)
    return batches


def steps_per_epoch(
    buckets: list[tuple[int, int]], repeats: list[int], batch_size: int, accumulation: int
) -> int:
    """Optimizer steps in one epoch (a final partial accumulation still makes a step)."""
    batches = len(epoch_batches(buckets, repeats, batch_size, seed=0, epoch=0))
    return max(1, -(-batches // accumulation))


def micro_batch_seed(seed: int, step: int, position: int) -> int:
    """Seed of the randomness (noise, timesteps, caption choices) of micro-batch `position` of optimizer step
    `step`: it depends on nothing else, so a step is the same whichever process trains each micro-batch and
    however many processes there are (2 processes with one micro-batch each = 1 process accumulating 2)."""
    digest = hashlib.sha256(f"{seed}:{step}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63, what torch.Generator.manual_seed takes
