"""The order of training samples: same-bucket batches, reshuffled every epoch from the run's seed.

The order of epoch e depends only on (seed, e), so a resumed run can rebuild it and skip to its position.
"""

from __future__ import annotations

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
