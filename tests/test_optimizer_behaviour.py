"""What trainers rely on: train/eval, checkpoints, fused backward pass, freezing, telemetry, bad input."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

from optim_cases import gradient_stream, make_params, param_groups
from ppsf_optim import ProdigyPlusScheduleFree
from ppsf_optim.tensor_math import RoundingNoise


def _optimizer(dtype=torch.float32, groups=2, **kwargs):
    params = make_params(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = ProdigyPlusScheduleFree(param_groups(params, groups), **kwargs)
    return params, optimizer


def _train(params, optimizer, steps, start=0):
    set_grads = gradient_stream(params, seed=100 + start)
    for t in range(start, start + steps):
        set_grads(t)
        optimizer.step()


def _weights(params):
    return {k: p.detach().clone() for k, p in params.items()}


# ---------------------------------------------------------------- train / eval
def test_eval_gives_the_average_and_train_restores_y() -> None:
    params, optimizer = _optimizer()
    _train(params, optimizer, 12)
    y = _weights(params)
    optimizer.eval()
    beta1 = optimizer.param_groups[0]["betas"][0]
    for name, p in params.items():
        z = optimizer.state[p]["z"]
        x = (y[name] - (1 - beta1) * z) / beta1  # y = (1 - beta1) z + beta1 x, solved for x
        torch.testing.assert_close(p.detach(), x, rtol=1e-5, atol=1e-7)
    optimizer.train()
    for name, p in params.items():
        torch.testing.assert_close(p.detach(), y[name], rtol=0, atol=1e-7)


def test_bf16_round_trip_is_within_one_rounding() -> None:
    params, optimizer = _optimizer(torch.bfloat16, d0=1e-3)
    _train(params, optimizer, 8)
    y = _weights(params)
    optimizer.eval()
    x = _weights(params)
    optimizer.train()
    for name, p in params.items():
        # x is rounded to bf16 once and y once more: at most about one bf16 step of the larger of the two
        gap = (p.detach().float() - y[name].float()).abs()
        assert torch.all(gap <= torch.maximum(y[name].float().abs(), x[name].float().abs()) * 2**-7), name
        assert (gap > 0).float().mean() < 0.2, name


def test_step_in_eval_mode_raises_and_changes_nothing() -> None:
    params, optimizer = _optimizer()
    _train(params, optimizer, 3)
    optimizer.eval()
    before_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    before_state = copy.deepcopy(optimizer.state_dict()["state"])
    before_weights = _weights(params)
    gradient_stream(params)(0)
    with pytest.raises(RuntimeError, match="optimizer.train"):
        optimizer.step()
    with pytest.raises(RuntimeError, match="optimizer.train"):
        optimizer.step_param(params["bias"], optimizer.param_groups[0])
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == before_groups
    after_state = optimizer.state_dict()["state"]
    for i, state in before_state.items():
        for key, value in state.items():
            assert torch.equal(after_state[i][key], value)
    for name, p in params.items():
        assert torch.equal(p.detach(), before_weights[name])
    optimizer.train()
    optimizer.step()  # and training goes on
    assert optimizer.param_groups[0]["k"] == 5


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_resume_from_state_dict_equals_uninterrupted(mode: str) -> None:
    params, optimizer = _optimizer(prodigy_steps=6)
    _train(params, optimizer, 10)
    straight = _weights(_train_more(params, optimizer, 7, start=10))
    straight_d = [g["d"] for g in optimizer.param_groups]

    resumed_params, first = _optimizer(prodigy_steps=6)
    _train(resumed_params, first, 10)
    if mode == "eval":
        first.eval()
    buffer = io.BytesIO()
    torch.save({"optimizer": first.state_dict(), "weights": _weights(resumed_params)}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    fresh_params, fresh = _optimizer(prodigy_steps=6)
    for name, p in fresh_params.items():
        p.data.copy_(checkpoint["weights"][name])
    fresh.load_state_dict(checkpoint["optimizer"])
    assert all(g["train_mode"] == (mode == "train") for g in fresh.param_groups)
    fresh.train()
    _train_more(fresh_params, fresh, 7, start=10)
    assert [g["d"] for g in fresh.param_groups] == straight_d
    for name, p in fresh_params.items():
        if mode == "train":
            assert torch.equal(p.detach(), straight[name]), name
        else:  # eval -> train moves weights through x, one float rounding away
            torch.testing.assert_close(p.detach(), straight[name], rtol=1e-5, atol=1e-6)


def _group_scalars(optimizer) -> list[dict]:
    """Each group's scalars (d, d_numerator, d_denom, k, ...), tuples as lists as JSON keeps them."""
    return [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}
        for g in optimizer.param_groups
    ]


def test_trainer_checkpoint_round_trips_prodigy_state_while_d_grows(tmp_path) -> None:
    """Through trainers.checkpoint (safetensors + JSON), with d never frozen: Prodigy's per-parameter s and
    p0 and its per-group numerator, denominator and d come back exactly, and the continued run equals the
    uninterrupted one bit for bit while d keeps growing. (The test above freezes d before saving, so there
    the statistics are already gone.)"""
    from trainers.checkpoint import TrainerState, load_checkpoint, save_checkpoint

    params, optimizer = _optimizer()  # prodigy_steps=0: d is estimated on every step
    _train(params, optimizer, 10)
    assert all("s" in optimizer.state[p] and "p0" in optimizer.state[p] for p in params.values())
    folder = save_checkpoint(
        tmp_path, TrainerState(step=10, epoch=0, batch_in_epoch=0), params, optimizer, torch.Generator(), 1
    )
    saved_groups = _group_scalars(optimizer)
    saved_state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in params.items()}
    _train(params, optimizer, 7, start=10)
    straight = _weights(params)
    straight_groups = _group_scalars(optimizer)
    straight_state = {name: optimizer.state[p] for name, p in params.items()}

    fresh_params, fresh = _optimizer()
    load_checkpoint(folder, fresh_params, fresh, torch.Generator())
    assert _group_scalars(fresh) == saved_groups
    for name, p in fresh_params.items():
        loaded = fresh.state[p]
        assert loaded.keys() == saved_state[name].keys(), name
        for key, value in saved_state[name].items():
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), (name, key)
    _train(fresh_params, fresh, 7, start=10)

    d_saved = [g["d"] for g in saved_groups]
    d_after = [g["d"] for g in fresh.param_groups]
    assert all(after > 1.5 * before for after, before in zip(d_after, d_saved)), (d_saved, d_after)
    assert _group_scalars(fresh) == straight_groups  # d, d_numerator, d_denom, weight_sum, k, ...
    for name, p in fresh_params.items():
        assert torch.equal(p.detach(), straight[name]), name
        for key, value in straight_state[name].items():
            assert torch.equal(fresh.state[p][key], value), (name, key)


def _train_more(params, optimizer, steps, start):
    _train(params, optimizer, steps, start=start)
    return params


def test_load_keeps_fp32_statistics_of_bf16_weights() -> None:
    params, optimizer = _optimizer(torch.bfloat16)
    _train(params, optimizer, 3)
    saved = copy.deepcopy(optimizer.state_dict())
    fresh_params, fresh = _optimizer(torch.bfloat16)
    fresh.load_state_dict(saved)
    p = fresh_params["linear_in_gt_out"]
    assert fresh.state[p]["exp_avg_sq_row"].dtype == torch.float32
    assert fresh.state[p]["exp_avg_sq_col"].dtype == torch.float32
    assert fresh.state[p]["z"].dtype == torch.bfloat16
    assert fresh.state[p]["s"].dtype == torch.bfloat16
    torch.testing.assert_close(fresh.state[p]["exp_avg_sq_row"], saved["state"][0]["exp_avg_sq_row"])


# ---------------------------------------------------------------- exact resume with 16-bit weights
# (route, weight dtype, options). The multi-tensor path takes bf16 weights; factored_fp32=False sends
# step() to the per-tensor reference step; fp16 weights always take the reference step.
_SIXTEEN_BIT_ROUTES = {
    "step-multi-tensor-bf16": ("step", torch.bfloat16, {}),
    "step-reference-bf16": ("step", torch.bfloat16, {"factored_fp32": False}),
    "step-fp16": ("step", torch.float16, {}),
    "fused-backward-one-bucket-bf16": ("fused", torch.bfloat16, {}),
    "fused-backward-each-gradient-bf16": ("fused-each", torch.bfloat16, {}),
    "step-param-bf16": ("step_param", torch.bfloat16, {"fused_back_pass": True}),
}


def _sixteen_bit_optimizer(route: str, dtype: torch.dtype, options: dict):
    params, optimizer = _optimizer(dtype, d0=1e-3, **options)  # d0 big enough that every rounding matters
    if route.startswith("fused"):
        optimizer.attach_fused_backward(1 if route == "fused-each" else 16 << 20)
    return params, optimizer


def _steps_by_route(route: str, params, optimizer, steps: int, start: int) -> None:
    """`_train`'s gradients, applied by `route`: step(), step_param() calls, or a real backward pass whose
    gradients are exactly the stream's (loss = sum <p, g>), stepped by the fused backward hooks."""
    set_grads = gradient_stream(params, seed=100 + start)
    for t in range(start, start + steps):
        set_grads(t)
        if route == "step":
            optimizer.step()
        elif route == "step_param":
            for group in optimizer.param_groups:
                for p in group["params"]:
                    optimizer.step_param(p, group)
            optimizer.end_step()
        else:
            grads = {p: p.grad for p in params.values() if p.grad is not None}
            for p in params.values():
                p.grad = None
            sum((p * g).sum() for p, g in grads.items()).backward()
    assert optimizer.param_groups[0]["k"] == start + steps + 1  # each step ran


def _assert_same_run(params, optimizer, straight_weights, straight_state, straight_groups) -> None:
    for name, p in params.items():
        assert torch.equal(p.detach(), straight_weights[name]), name
        assert optimizer.state[p].keys() == straight_state[name].keys(), name
        for key, value in straight_state[name].items():
            assert torch.equal(optimizer.state[p][key], value), (name, key)
    assert _group_scalars(optimizer) == straight_groups


def _straight_run(route: str, dtype: torch.dtype, options: dict, save):
    """6 steps, `save(params, optimizer)`, 5 more; returns what `save` returned and the final run."""
    torch.manual_seed(0)
    params, optimizer = _sixteen_bit_optimizer(route, dtype, options)
    _steps_by_route(route, params, optimizer, 6, start=0)
    saved = save(params, optimizer)
    _steps_by_route(route, params, optimizer, 5, start=6)
    state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in params.items()}
    return saved, (_weights(params), state, _group_scalars(optimizer))


@pytest.mark.parametrize("case", list(_SIXTEEN_BIT_ROUTES))
def test_16_bit_resume_from_state_dict_equals_uninterrupted(case: str) -> None:
    """Stochastic rounding draws fresh noise every step. A fresh optimizer loaded from state_dict, with
    torch's global RNG state restored to what it was at the save (as trainers do), must draw the noise the
    uninterrupted run drew: the continued run equals it bit for bit, weights and every state tensor."""
    route, dtype, options = _SIXTEEN_BIT_ROUTES[case]

    def save(params, optimizer):
        buffer = io.BytesIO()
        checkpoint = {"optimizer": optimizer.state_dict(), "weights": _weights(params)}
        torch.save({**checkpoint, "rng": torch.get_rng_state()}, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)  # nothing but tensors and plain values

    checkpoint, straight = _straight_run(route, dtype, options, save)

    torch.manual_seed(1)  # a new process: its RNG is anywhere until the checkpoint restores it
    fresh_params, fresh = _sixteen_bit_optimizer(route, dtype, options)
    with torch.no_grad():
        for name, p in fresh_params.items():
            p.copy_(checkpoint["weights"][name])
    fresh.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    _steps_by_route(route, fresh_params, fresh, 5, start=6)
    _assert_same_run(fresh_params, fresh, *straight)


@pytest.mark.parametrize("case", list(_SIXTEEN_BIT_ROUTES))
def test_16_bit_steps_leave_torch_global_rng_alone(case: str) -> None:
    """The rounding noise is the optimizer's own stream: the caller's random numbers (dropout, timesteps)
    come out the same whether or not the optimizer steps in between."""
    route, dtype, options = _SIXTEEN_BIT_ROUTES[case]
    torch.manual_seed(0)
    params, optimizer = _sixteen_bit_optimizer(route, dtype, options)
    before = torch.get_rng_state()
    _steps_by_route(route, params, optimizer, 3, start=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_state_dict_without_rounding_seed_still_loads_and_steps() -> None:
    """State dicts saved before the seed existed: the loading optimizer's own seed is used."""
    params, optimizer = _optimizer(torch.bfloat16)
    _train(params, optimizer, 2)
    saved = copy.deepcopy(optimizer.state_dict())
    for group in saved["param_groups"]:
        del group["rounding_seed"]
    fresh_params, fresh = _optimizer(torch.bfloat16)
    fresh.load_state_dict(saved)
    assert [g["rounding_seed"] for g in fresh.param_groups] == [fresh.defaults["rounding_seed"]] * 2
    _train(fresh_params, fresh, 2, start=2)
    assert fresh.param_groups[0]["k"] == 5


@pytest.mark.parametrize("case", ["step-multi-tensor-bf16", "step-reference-bf16", "step-param-bf16"])
def test_16_bit_resume_through_trainer_checkpoint_equals_uninterrupted(case: str, tmp_path) -> None:
    """The same through trainers.checkpoint (safetensors tensors, JSON groups, RNG states), which keeps only
    per-parameter tensors and JSON-able group entries: whatever the rounding noise needs must be one."""
    from trainers.checkpoint import TrainerState, load_checkpoint, save_checkpoint

    route, dtype, options = _SIXTEEN_BIT_ROUTES[case]

    def save(params, optimizer):
        state = TrainerState(step=6, epoch=0, batch_in_epoch=0)
        return save_checkpoint(tmp_path, state, params, optimizer, torch.Generator(), 1)

    folder, straight = _straight_run(route, dtype, options, save)

    torch.manual_seed(1)
    fresh_params, fresh = _sixteen_bit_optimizer(route, dtype, options)
    load_checkpoint(folder, fresh_params, fresh, torch.Generator())
    _steps_by_route(route, fresh_params, fresh, 5, start=6)
    _assert_same_run(fresh_params, fresh, *straight)


# ---------------------------------------------------------------- fused backward pass
class _TwoBranchNet(torch.nn.Module):
    """A net where `side` only gets a gradient when the batch asks for it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(40, 64)
        self.b = torch.nn.Linear(64, 8)
        self.side = torch.nn.Linear(40, 8)
        self.unused = torch.nn.Linear(3, 3)  # in the optimizer, never in the graph

    def forward(self, x: torch.Tensor, use_side: bool) -> torch.Tensor:
        out = self.b(torch.tanh(self.a(x)))
        return out + self.side(x) if use_side else out


def _net_run(fused: bool, steps: int = 15, bucket_bytes: int = 16 << 20):
    net = _TwoBranchNet()
    groups = [
        {"params": list(net.a.parameters()) + list(net.side.parameters())},
        {"params": list(net.b.parameters()) + list(net.unused.parameters()), "lr": 0.5},
    ]
    optimizer = ProdigyPlusScheduleFree(groups)
    handle = optimizer.attach_fused_backward(bucket_bytes) if fused else None
    generator = torch.Generator().manual_seed(3)
    for t in range(steps):
        x = torch.randn(16, 40, generator=generator)
        target = torch.randn(16, 8, generator=generator)
        loss = ((net(x, use_side=t % 3 != 0) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return net, optimizer, handle


@pytest.mark.parametrize("bucket_bytes", [1, 16 << 20], ids=["each-gradient-at-once", "one-bucket"])
def test_fused_backward_equals_step_with_params_missing_gradients(bucket_bytes: int) -> None:
    net_plain, plain, _ = _net_run(fused=False)
    net_fused, fused, _ = _net_run(fused=True, bucket_bytes=bucket_bytes)
    assert [g["k"] for g in fused.param_groups] == [16, 16]  # one step per backward pass
    assert [g["d"] for g in fused.param_groups] == pytest.approx(
        [g["d"] for g in plain.param_groups], rel=1e-5
    )
    assert fused.param_groups[0]["d"] > 1e-5
    for (name, a), b in zip(net_fused.named_parameters(), net_plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert a.grad is None, f"fused pass must free {name}'s gradient"
    assert torch.equal(net_fused.unused.weight, _TwoBranchNet().unused.weight)


def test_fused_backward_frees_gradients_as_buckets_fill() -> None:
    """With a bucket smaller than one gradient, no two gradients are ever alive at once."""
    net = _TwoBranchNet()
    params = list(net.parameters())
    optimizer = ProdigyPlusScheduleFree(params)
    alive = []
    for p in params:  # registered before the fused hooks: sees each gradient before it is stepped
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    optimizer.attach_fused_backward(bucket_bytes=1)
    (net(torch.randn(4, 40), use_side=True) ** 2).mean().backward()
    assert max(alive) == 1 and all(p.grad is None for p in params)
    assert optimizer.param_groups[0]["k"] == 2


def test_step_is_a_no_op_while_fused_and_remove_restores_it() -> None:
    net, optimizer, handle = _net_run(fused=True, steps=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    handle.remove()
    optimizer.step()
    assert not torch.equal(before["a.weight"], net.a.weight)


def test_step_param_outside_backward_needs_an_explicit_end() -> None:
    params, manual = _optimizer(fused_back_pass=True)
    plain_params, plain = _optimizer()
    set_manual, set_plain = gradient_stream(params), gradient_stream(plain_params)
    for t in range(6):
        set_manual(t)
        set_plain(t)
        for group in manual.param_groups:
            for p in group["params"]:
                manual.step_param(p, group)
        manual.end_step()
        plain.step()
    assert [g["d"] for g in manual.param_groups] == pytest.approx(
        [g["d"] for g in plain.param_groups], rel=1e-5
    )
    for name, p in params.items():
        torch.testing.assert_close(p, plain_params[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- prodigy_steps and telemetry
def test_prodigy_steps_freezes_d_and_frees_prodigy_state() -> None:
    # like 1.8.33: d is last updated at the end of step 4 and used frozen from step 5 on
    params, optimizer = _optimizer(prodigy_steps=5)
    _train(params, optimizer, 3)
    bytes_before = sum(t["state_bytes"] for t in optimizer.telemetry())
    assert not any(t["d_frozen"] for t in optimizer.telemetry())
    _train(params, optimizer, 1, start=3)
    assert [g["d"] for g in optimizer.param_groups] != [g["d0"] for g in optimizer.param_groups]
    frozen_d = [g["d"] for g in optimizer.param_groups]
    report = optimizer.telemetry()
    assert all(t["d_frozen"] and t["d_frozen_since_step"] == 5 for t in report)
    _train(params, optimizer, 5, start=5)
    assert [g["d"] for g in optimizer.param_groups] == frozen_d
    assert all("s" not in optimizer.state[p] and "p0" not in optimizer.state[p] for p in params.values())
    assert sum(t["state_bytes"] for t in optimizer.telemetry()) < bytes_before


def test_freeze_d_now() -> None:
    params, optimizer = _optimizer()
    _train(params, optimizer, 6)
    optimizer.freeze_d()
    d = [g["d"] for g in optimizer.param_groups]
    _train(params, optimizer, 4, start=6)
    assert [g["d"] for g in optimizer.param_groups] == d
    assert optimizer.telemetry()[0]["d_frozen_since_step"] == 7


def test_telemetry_reports_what_the_step_applies() -> None:
    params, optimizer = _optimizer(split_groups_mean=True)
    _train(params, optimizer, 10)
    report = optimizer.telemetry()
    ds = [g["d"] for g in optimizer.param_groups]
    harmonic = len(ds) / sum(1 / d for d in ds)
    for entry, group in zip(report, optimizer.param_groups):
        assert entry["d"] == group["d"]
        assert entry["applied_lr"] == pytest.approx(harmonic * group["lr"])
        assert group["d"] * group["effective_lr"] == pytest.approx(entry["applied_lr"])
        assert entry["step"] == 10 and entry["nonfinite_skips"] == 0 and not entry["d_frozen"]
        expected = sum(
            v.numel() * v.element_size()
            for p in group["params"]
            for v in optimizer.state[p].values()
            if torch.is_tensor(v)
        )
        assert entry["state_bytes"] == expected > 0


# ---------------------------------------------------------------- non-finite gradients
def test_nan_gradient_skips_the_step() -> None:
    params, optimizer = _optimizer()
    _train(params, optimizer, 4)
    before = copy.deepcopy(optimizer.state_dict())
    weights = _weights(params)
    gradient_stream(params)(0)
    params["lora_down"].grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN/inf"):
        optimizer.step()
    assert all(torch.equal(p.detach(), weights[k]) for k, p in params.items())
    assert [g["d"] for g in optimizer.param_groups] == [g["d"] for g in before["param_groups"]]
    assert [g["k"] for g in optimizer.param_groups] == [5, 5]
    assert all(t["nonfinite_skips"] == 1 for t in optimizer.telemetry())
    _train(params, optimizer, 2, start=4)  # and it recovers
    assert all(torch.isfinite(p).all() for p in params.values())


def test_inf_gradient_in_fused_mode_skips_that_parameter_and_the_d_update() -> None:
    net, optimizer, _ = _net_run(fused=True, steps=4)
    d_before = [g["d"] for g in optimizer.param_groups]
    bad_before = net.a.weight.detach().clone()
    other_before = net.b.weight.detach().clone()
    bad_state = copy.deepcopy(optimizer.state[net.a.weight])

    def poison(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[0, 0] = float("inf")
        return grad

    hook = net.a.weight.register_hook(poison)
    with pytest.warns(UserWarning, match="NaN/inf"):
        (net(torch.randn(4, 40), use_side=True) ** 2).mean().backward()
    hook.remove()
    assert torch.equal(net.a.weight.detach(), bad_before)
    for key, value in bad_state.items():
        assert torch.equal(optimizer.state[net.a.weight][key], value), key
    assert not torch.equal(net.b.weight.detach(), other_before)
    assert optimizer.param_groups[0]["d"] == d_before[0]
    assert optimizer.telemetry()[0]["nonfinite_skips"] == 1
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"betas": (1.0, 0.99)}, "betas"),
        ({"betas": (0.9, -0.1)}, "betas"),
        ({"beta3": 1.5}, "beta3"),
        ({"d0": 0.0}, "d0"),
        ({"d_coef": 0.0}, "d_coef"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"eps": 0.0}, "eps"),
        ({"prodigy_steps": -1}, "prodigy_steps"),
        ({"schedulefree_c": -1.0}, "schedulefree_c"),
        ({"use_focus": True}, "use_focus"),
    ],
)
def test_impossible_arguments_are_rejected_by_name(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        ProdigyPlusScheduleFree([torch.nn.Parameter(torch.zeros(3))], **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": None}, "use_stableadamw is off"),
        ({"use_cautious": True, "use_grams": True}, "use_grams is off"),
        ({"lr": 1e-4}, "keep lr=1.0"),
        ({"use_speed": True, "weight_decay": 0.1}, "explode"),
    ],
)
def test_unwise_combinations_warn(kwargs: dict, message: str) -> None:
    with pytest.warns(UserWarning, match=message):
        ProdigyPlusScheduleFree([torch.nn.Parameter(torch.zeros(3))], **kwargs)


# ---------------------------------------------------------------- stochastic rounding
def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    down = (x.view(torch.int32) & -65536).view(torch.float32)
    up = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    return down, up


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours() -> None:
    torch.manual_seed(0)
    x = torch.rand(64) * 4 - 2
    down, up = _bf16_neighbours(x)
    noise = RoundingNoise()
    group = {"rounding_seed": 5, "k": 1}  # one long step: 4000 draws, each with its own key
    for name, rounder in [
        (
            "reference",
            lambda v: (lambda t: (noise.copy_stochastic_(t, v, group), t.float())[1])(
                torch.empty_like(v, dtype=torch.bfloat16)
            ),
        ),
        ("multi-tensor", lambda v: noise.round_(v.clone(), group).float()),
    ]:
        draws = torch.stack([rounder(x) for _ in range(4000)])
        assert torch.all((draws == down) | (draws == up)), name
        # the mean of the draws converges to x: within 5 standard errors of a two-point distribution
        p_up = (x - down) / (up - down)
        standard_error = (up - down).abs() * torch.sqrt(p_up * (1 - p_up) / draws.shape[0])
        assert torch.all((draws.mean(0) - x).abs() <= 5 * standard_error + 1e-9), name
        assert ((draws.mean(0) - x).abs() / (up - down).abs()).max() < 0.1


def test_rounding_noise_window_is_uniform() -> None:
    noise = RoundingNoise()
    window = noise.window(RoundingNoise.POOL_SIZE, torch.device("cpu"), {"rounding_seed": 5, "k": 1})
    counts = torch.bincount(window.long(), minlength=1 << 16)
    assert counts.min() == counts.max() == 16  # every 16-bit value equally often, whatever the offset


# ---------------------------------------------------------------- muon on conv weights (1.8.33 raises)
def test_muon_orthogonalises_conv_weights() -> None:
    params, optimizer = _optimizer(use_muon_pp=True)
    conv_before = params["conv"].detach().clone()
    _train(params, optimizer, 5)
    assert torch.isfinite(params["conv"]).all()
    assert not torch.equal(params["conv"].detach(), conv_before)
    assert "muon_rms_sq" in optimizer.state[params["conv"]]


def _gradient_with_spread_spectrum(shape: tuple[int, ...], seed: int = 0):
    """A gradient whose (out, rest) matrix is U diag(sigma) V^T with sigma spread over 1..31.6 (so it is
    far from orthogonal: singular values 30x apart); returns (gradient, U, sigma, V)."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    rank = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, rank, generator=generator))
    sigma = torch.logspace(0, 1.5, rank)
    return (u @ torch.diag(sigma) @ v.T).reshape(shape), u, sigma, v


def _written_out_newton_schulz(u, sigma, v, steps: int = 6):
    """Muon's quintic iteration acts on each singular value alone: X = U diag(f(sigma / |G|_F)) V^T with
    f the polynomial a s + b s^3 + c s^5 applied `steps` times (Keller Jordan's coefficients)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    s = sigma / sigma.norm()
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return u @ torch.diag(s) @ v.T


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("shape", [(48, 72), (72, 48), (16, 8, 3, 3)], ids=str)
def test_newton_schulz_matches_the_written_out_iteration(shape: tuple[int, ...]) -> None:
    from ppsf_optim.tensor_math import newton_schulz_orthogonalise

    grad, u, sigma, v = _gradient_with_spread_spectrum(shape)
    result = newton_schulz_orthogonalise(grad)
    assert result.shape == grad.shape
    matrix = result.reshape(shape[0], -1)
    expected = _written_out_newton_schulz(u, sigma, v)  # <G, X> > 1 here, so adaptive Muon's scale is 1
    assert torch.linalg.norm(matrix - expected) < 0.05 * torch.linalg.norm(expected)  # bf16 iteration
    singular = torch.linalg.svdvals(matrix)
    # the quintic iteration leaves every singular value in a band around 1 (about 0.68..1.13), not at 1
    assert singular.min() > 0.6 and singular.max() < 1.2, singular
    assert _cosine(matrix, u @ v.T) > 0.97  # close to the polar factor; the gradient itself is at 0.73


def test_muon_step_on_a_conv_weight_is_orthogonalised() -> None:
    """The optimizer's own update (reference path: the fast path does not take Muon), not just the helper:
    a first step moves y = z by d0 * u, and u's flattened matrix has all singular values about equal and
    points along the gradient's polar factor U V^T (a gradient passed through keeps a 30x spread)."""
    grad, u, _, v = _gradient_with_spread_spectrum((48, 8, 3, 3), seed=1)
    p = torch.nn.Parameter(torch.randn(48, 8, 3, 3, generator=torch.Generator().manual_seed(2)))
    before = p.detach().clone()
    optimizer = ProdigyPlusScheduleFree([p], d0=0.01, prodigy_steps=1, use_muon_pp=True)
    p.grad = grad.clone()
    optimizer.step()
    assert "muon_rms_sq" in optimizer.state[p]
    update = ((before - p.detach()) / 0.01).reshape(48, -1)
    singular = torch.linalg.svdvals(update)
    assert singular.max() / singular.min() < 2.0, singular
    assert _cosine(update, u @ v.T) > 0.97
