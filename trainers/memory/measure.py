"""Measuring what a forward/backward pass allocates, on the `meta` device (no weights, no compute).

Three tools, each usable on real tensors too (that is how the tests check them against a real CPU run):
- `LiveTensors`: a dispatch mode that counts the bytes of every tensor storage created while it is active
  and still alive (freed storages are subtracted when Python releases them), with the peak.
- `saved_for_backward`: sums the bytes autograd saves for backward (`saved_tensors_hooks`), once per storage.
- `DeviceEmulation`: a function mode that applies, on meta tensors, what the target device would do that
  the meta device does not: autocast's casting policy and the fused attention kernel that device picks
  (meta's own SDPA is the math path, which would keep the whole attention matrix for backward).
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_leaves, tree_map

aten = torch.ops.aten


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in an op's arguments or outputs (a tensor, or a flat or nested tuple/list of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        found = []
        for item in value:
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif isinstance(item, tuple | list):
                found.extend(_tensors(item))
        return found
    return []


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it), stable while the storage lives."""
    return tensor.untyped_storage()._cdata


class LiveTensors(TorchDispatchMode):
    """Bytes of the tensor storages created while active and not yet freed, and their peak.

    Storages that existed before (weights) are not counted unless `add` is given them. Outputs that alias
    an input (views, in-place ops) are not new memory and are skipped.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self._gc_states: list[bool] = []  # per (re-)entry: whether the collector was on before it

    # Storages are keyed by address and freed storages subtracted when Python releases them: the cyclic
    # collector running at some moment of a pass freed earlier garbage mid-measurement and moved the figures
    # by ~2% from run to run. While counting, only reference counting frees, so a pass always counts the same.
    def __enter__(self):
        self._gc_states.append(gc.isenabled())
        if gc.isenabled():  # the outermost entry; checkpointing re-enters the mode mid-pass
            gc.collect()
            gc.disable()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            if self._gc_states.pop():
                gc.enable()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = _tensors(out)
        if outputs:
            inputs = {storage_key(t) for t in _tensors(args)}
            if kwargs:
                inputs.update(storage_key(t) for t in _tensors(tuple(kwargs.values())))
            for tensor in outputs:
                if storage_key(tensor) not in inputs:
                    self.add(tensor)
        return out

    def add(self, tensor: torch.Tensor) -> None:
        """Count `tensor`'s storage (once) until it is freed."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        nbytes = storage.nbytes()
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current


@contextlib.contextmanager
def saved_for_backward(tracker: LiveTensors) -> Iterator[dict[int, int]]:
    """Yields {storage: bytes} of the tensors autograd saves for backward that `tracker` saw being created
    and that are still alive when the block ends (weights saved for backward already exist and are
    counted as weights, not activations)."""
    saved: dict[int, int] = {}
    storages: dict[int, weakref.ref] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key in tracker.live:
            saved[key] = tracker.live[key]
            storages[key] = weakref.ref(tensor.untyped_storage())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved
    drop_freed(saved, storages)


def drop_freed(entries: dict[int, int], storages: dict[int, weakref.ref]) -> None:
    """Remove the entries whose storage was freed. A tensor saved by a part of the graph the loss does not
    use is freed with it; keeping its entry counted it unless a later storage reused its address, which
    moved the figure by ~0.5% with the allocator's history."""
    for key, storage in storages.items():
        if storage() is None:
            entries.pop(key, None)


class CheckpointInputs:
    """A gradient-checkpointing function that records what non-reentrant checkpointing keeps: the inputs
    of each checkpointed block (its saved tensors are recomputed in backward, so hooks never see them).
    The recomputation runs inside autograd's engine, outside the modes of the forward pass, so they are
    entered again there, as torch's checkpoint does for autocast."""

    def __init__(self, tracker: LiveTensors, emulation: DeviceEmulation) -> None:
        self.tracker = tracker
        self.emulation = emulation
        self._kept: dict[int, int] = {}
        self._storages: dict[int, weakref.ref] = {}

    @property
    def kept(self) -> dict[int, int]:
        """{storage: bytes} of the checkpointed blocks' inputs still held for backward."""
        drop_freed(self._kept, self._storages)
        return self._kept

    def __call__(self, function, *args, **kwargs):
        if torch.is_grad_enabled():
            for tensor in tree_leaves((args, kwargs)):
                if isinstance(tensor, torch.Tensor) and storage_key(tensor) in self.tracker.live:
                    self._kept[storage_key(tensor)] = self.tracker.live[storage_key(tensor)]
                    self._storages[storage_key(tensor)] = weakref.ref(tensor.untyped_storage())
        return torch.utils.checkpoint.checkpoint(
            self._in_modes(function), *args, use_reentrant=False, **kwargs
        )

    def _in_modes(self, function):
        def run(*args, **kwargs):
            with contextlib.ExitStack() as modes:
                if self.emulation not in _function_modes():
                    modes.enter_context(self.emulation)
                if self.tracker not in _get_current_dispatch_mode_stack():
                    modes.enter_context(self.tracker)
                return function(*args, **kwargs)

        return run


def _function_modes() -> list:
    from torch.overrides import _get_current_function_mode_stack

    return _get_current_function_mode_stack()


# Autocast's op lists (PyTorch docs, "Automatic Mixed Precision package"), for the functions diffusion
# models call from Python. Ops outside these lists run in their inputs' dtype, as under autocast.
_LOWER_PRECISION = {
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "matmul", "__matmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "prelu",
    "scaled_dot_product_attention",
}  # fmt: skip
_FP32 = {
    "cuda": {
        "group_norm", "layer_norm", "softmax", "log_softmax", "mse_loss", "l1_loss", "smooth_l1_loss",
        "exp", "log", "pow", "rsqrt", "norm", "normalize", "softplus", "cumsum", "cumprod", "sum", "prod",
        "cosine_similarity", "cross_entropy", "nll_loss", "kl_div",
    },
    "cpu": {
        "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "cross_entropy", "nll_loss", "kl_div",
        "prod", "cdist",
    },
}  # fmt: skip


class DeviceEmulation(TorchFunctionMode):
    """Casts like `torch.autocast(device_type, dtype)` and picks the fused attention kernel `device_type`
    would, so a meta-device pass keeps what the real device keeps."""

    def __init__(self, device_type: str, autocast_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.device_type = device_type
        self.autocast_dtype = autocast_dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.autocast_dtype is not None:
            if name in _LOWER_PRECISION:
                args, kwargs = _cast((args, kwargs), self.autocast_dtype)
            elif name in _FP32[self.device_type]:
                args, kwargs = _cast((args, kwargs), torch.float32)
        if name == "scaled_dot_product_attention":
            return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        if self.device_type == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
            )[0]
        if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
            return aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale
            )[0]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        return aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, needs_grad, dropout_p, is_causal, scale=scale
        )[0]


def _cast(tree, dtype: torch.dtype):
    def cast(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            return value.to(dtype)
        return value

    return tree_map(cast, tree)


def fused_gradient_buckets(params: list[torch.nn.Parameter], bucket_bytes: int) -> list:
    """Free gradients in buckets during backward as ppsf_optim's `attach_fused_backward(bucket_bytes)` does
    (the optimizer step itself is accounted separately); returns the hook handles."""
    pending: list[torch.nn.Parameter] = []
    pending_bytes = [0]

    def hook(p: torch.nn.Parameter) -> None:
        pending.append(p)
        pending_bytes[0] += p.grad.numel() * p.grad.element_size()
        if pending_bytes[0] >= bucket_bytes:
            for q in pending:
                q.grad = None
            pending.clear()
            pending_bytes[0] = 0

    return [p.register_post_accumulate_grad_hook(hook) for p in params]
