"""The fused backward pass under torch DistributedDataParallel: step each gradient bucket once it is
all-reduced.

On one process the fused pass steps a parameter as soon as its gradient is complete. Under DDP a gradient
is only final once its bucket's all-reduce has finished, so the post-accumulate-grad hooks would step with
the local gradient. Instead, a DDP communication hook averages the bucket (as DDP's default hook does) and
chains the optimizer's step of the bucket's parameters onto the all-reduce future: communication of later
buckets overlaps the step of earlier ones, and the step ends when backward ends, as on one process.

Prodigy's d is a function of sums over all parameters of the step (`<g, p0 - z>` and `||s||_1`, gathered in
the optimizer's per-group accumulators and read in `end_step`). Every rank steps every bucket with the same
averaged gradient and the same state, so those sums are the same on every rank without any further
communication, provided they are added up in the same order: all-reduce futures complete in any order (and
on gloo in its worker threads), so buckets are stepped strictly in bucket order, one at a time. The same
order keeps stochastic rounding's noise (keyed by the draw's index within the step) the same on every rank.
d is then bitwise identical across ranks; `same_on_all_ranks` checks that cheaply.

Torch only.
"""

import threading
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .optimizer import ProdigyPlusScheduleFree


class _BucketStepper:
    """State of the communication hook: buckets all-reduced but not yet stepped, and the step's futures."""

    def __init__(self, optimizer: ProdigyPlusScheduleFree, process_group: Any | None) -> None:
        self.optimizer = optimizer
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self._lock = threading.Lock()  # gloo runs future callbacks in its worker threads
        self._reduced: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}
        self._next_bucket = 0
        self._futures: list[torch.futures.Future] = []
        self._end_queued = False

    def launch(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """Average the bucket across ranks; its parameters are stepped once that is done."""
        if not self._end_queued:  # called in the backward pass: end the step when the pass ends
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._end_queued = True
        buffer = bucket.buffer()
        buffer.div_(self.world_size)
        index, params = bucket.index(), bucket.parameters()
        reduced = dist.all_reduce(buffer, group=self.process_group, async_op=True).get_future()
        chained = reduced.then(lambda future: self._reduced_bucket(index, params, future.value()[0]))
        self._futures.append(chained)
        return chained

    def _reduced_bucket(self, index: int, params: list[torch.Tensor], buffer: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self._reduced[index] = (params, buffer)
            self._step_ready_buckets()
        # the buffer is zeroed once its parameters are stepped: DDP copies it into the gradients when
        # backward ends, so the next backward pass accumulates from zero
        return buffer

    def _step_ready_buckets(self) -> None:
        """Step the all-reduced buckets that come next in bucket order (the order fixes d's sums)."""
        while self._next_bucket in self._reduced:
            params, buffer = self._reduced.pop(self._next_bucket)
            self.optimizer.step_params(params)  # their .grad are views of the averaged buffer
            buffer.zero_()
            self._next_bucket += 1

    def _end_of_backward(self) -> None:
        futures, self._futures, self._end_queued = self._futures, [], False
        torch.futures.wait_all(futures)  # raises what a bucket's all-reduce or step raised
        with self._lock:
            if self._reduced:
                raise RuntimeError(
                    f"DDP buckets {sorted(self._reduced)} were all-reduced but bucket {self._next_bucket} "
                    "never was; the optimizer step is incomplete"
                )
            self._next_bucket = 0
        self.optimizer.end_step()


def attach_fused_ddp(
    model: DistributedDataParallel, optimizer: ProdigyPlusScheduleFree, process_group: Any | None = None
) -> None:
    """Make each backward pass of `model` one optimizer step, bucket by bucket as all-reduces complete.

    `model` must be built with `gradient_as_bucket_view=True` (the parameters' gradients are then views of
    DDP's buckets, so the hook steps with the averaged values and no second copy of the gradients exists)
    and without gradient accumulation (`no_sync`): each backward pass is a step. The optimizer's `step()`
    only ends a step left open (as with `attach_fused_backward`); `zero_grad` is not needed.
    """
    if not model.gradient_as_bucket_view:
        raise ValueError("attach_fused_ddp needs DistributedDataParallel(..., gradient_as_bucket_view=True)")
    optimizer.fused_back_pass = True
    stepper = _BucketStepper(optimizer, process_group)
    model.register_comm_hook(stepper, _comm_hook)


def _comm_hook(stepper: "_BucketStepper", bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    return stepper.launch(bucket)


def same_on_all_ranks(values: list[float], process_group: Any | None = None) -> bool:
    """Whether `values` (e.g. each group's d) are bitwise the same on every rank: one all-reduce of min
    and max."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend(process_group) == "nccl":
        tensor = tensor.cuda()
    low, high = tensor.clone(), tensor.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=process_group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=process_group)
    return bool(torch.equal(low, high))
