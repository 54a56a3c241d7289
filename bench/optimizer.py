"""Optimizer step time, state memory and fused-backward gradient memory, side by side with the peers.

    python bench/optimizer.py            # full run (a few minutes on 2 CPU cores)
    python bench/optimizer.py --quick    # fewer repeats

Peers in the same run: torch AdamW (foreach and fused), schedulefree's AdamWScheduleFree, and the public
prodigy-plus-schedule-free releases 1.8.33 (installed from requirements-dev.txt) and 2.0.1 (fetched with
`pip download` into ~/.cache/ppsf-bench if the registry is reachable, imported under another name).
Times are the median of interleaved repeats; ratios are to torch AdamW(foreach), the target being <= 1.5x.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import statistics
import subprocess
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ppsf_optim import ProdigyPlusScheduleFree  # noqa: E402

warnings.filterwarnings("ignore")
CACHE = Path.home() / ".cache" / "ppsf-bench"


def lora_set(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """160 rank-16 LoRA pairs at SDXL attention widths: 5.2M parameters in 320 tensors, ups at zero."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for width in [640] * 80 + [1280] * 64 + [2048] * 16:
        params.append(torch.nn.Parameter((torch.randn(16, width, generator=generator) * 0.01).to(dtype)))
        params.append(torch.nn.Parameter(torch.zeros(width, 16, dtype=dtype)))
    return params


def dense_set(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """64 dense matrices of 680x680: 29.6M parameters, a full fine-tune's shape of work."""
    generator = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter((torch.randn(680, 680, generator=generator) * 0.02).to(dtype)) for _ in range(64)
    ]


def load_release_2_0_1() -> type | None:
    """The 2.0.1 release's class, imported from its wheel under another module name, or None."""
    folder = CACHE / "prodigy_plus_schedule_free-2.0.1"
    if not folder.exists():
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE),
                 "prodigy-plus-schedule-free==2.0.1"],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            wheel = next(CACHE.glob("prodigy_plus_schedule_free-2.0.1-*.whl"))
            zipfile.ZipFile(wheel).extractall(folder)
        except (subprocess.SubprocessError, StopIteration, OSError):
            return None
    saved = {k: v for k, v in sys.modules.items() if k == "prodigyplus" or k.startswith("prodigyplus.")}
    for key in saved:
        del sys.modules[key]
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module("prodigyplus").ProdigyPlusScheduleFree
    finally:
        sys.path.remove(str(folder))
        for key in [k for k in sys.modules if k == "prodigyplus" or k.startswith("prodigyplus.")]:
            sys.modules[f"release_2_0_1.{key}"] = sys.modules.pop(key)
        sys.modules.update(saved)


def peers() -> dict[str, Callable]:
    found: dict[str, Callable] = {
        "AdamW foreach": lambda p: torch.optim.AdamW(p, lr=1e-4, foreach=True),
        "AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-4, fused=True),
        "ppsf_optim": lambda p: ProdigyPlusScheduleFree(p),
    }
    try:
        from prodigyplus import ProdigyPlusScheduleFree as Release1833

        found["PPSF 1.8.33"] = lambda p: Release1833(p)
    except ImportError:
        print("prodigy-plus-schedule-free 1.8.33 not installed: pip install -r requirements-dev.txt")
    release_2 = load_release_2_0_1()
    if release_2 is not None:
        found["PPSF 2.0.1"] = lambda p: release_2(p)
    try:
        from schedulefree import AdamWScheduleFree

        def schedule_free_adamw(p):
            optimizer = AdamWScheduleFree(p, lr=1e-3)
            optimizer.train()
            return optimizer

        found["SF-AdamW"] = schedule_free_adamw
    except ImportError:
        pass
    return found


def prepared(make: Callable, factory: Callable, dtype: torch.dtype):
    params = make(dtype)
    with contextlib.redirect_stdout(io.StringIO()):  # the public releases print notices
        optimizer = factory(params)
    generator = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(dtype)
    with contextlib.redirect_stdout(io.StringIO()):
        optimizer.step()  # state initialised outside the timing
    return params, optimizer


def step_times(make: Callable, dtype: torch.dtype, candidates: dict[str, Callable], repeats: int) -> dict:
    """Median seconds per step, the candidates interleaved so machine noise hits them alike."""
    setups = {}
    for name, factory in candidates.items():
        try:
            setups[name] = prepared(make, factory, dtype)
        except (RuntimeError, TypeError) as error:  # e.g. fused AdamW without bf16 support on a device
            print(f"  {name}: skipped ({error})")
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(repeats):
        for name, (_, optimizer) in setups.items():
            start = time.perf_counter()
            for _ in range(3):
                optimizer.step()
            samples[name].append((time.perf_counter() - start) / 3)
    return {name: statistics.median(values) for name, values in samples.items()}


def state_bytes_per_param(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> float:
    total = 0
    for p in params:
        for value in optimizer.state[p].values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
            elif isinstance(value, list):
                total += sum(v.numel() * v.element_size() for v in value if torch.is_tensor(v))
    return total / sum(p.numel() for p in params)


def state_memory_table(candidates: dict[str, Callable]) -> list[str]:
    rows = ["| state bytes / param | " + " | ".join(candidates) + " |", "|---" * (len(candidates) + 1) + "|"]
    configs = [
        ("LoRA fp32", lora_set, torch.float32, {}),
        ("LoRA bf16", lora_set, torch.bfloat16, {}),
        ("dense fp32", dense_set, torch.float32, {}),
        ("LoRA fp32, factored=False", lora_set, torch.float32, {"factored": False}),
        ("LoRA fp32, after prodigy_steps", lora_set, torch.float32, {"prodigy_steps": 2}),
        ("LoRA bf16, after prodigy_steps", lora_set, torch.bfloat16, {"prodigy_steps": 2}),
    ]
    for label, make, dtype, options in configs:
        cells = []
        for name, factory in candidates.items():
            if options and not name.startswith(("ppsf", "PPSF")):
                cells.append("")
                continue
            build = factory if not options else _with_options(name, options)
            params, optimizer = prepared(make, build, dtype)
            with contextlib.redirect_stdout(io.StringIO()):
                optimizer.step()
            cells.append(f"{state_bytes_per_param(optimizer, params):.2f}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def _with_options(name: str, options: dict) -> Callable:
    if name == "ppsf_optim":
        return lambda p: ProdigyPlusScheduleFree(p, **options)
    if name == "PPSF 1.8.33":
        from prodigyplus import ProdigyPlusScheduleFree as Release1833

        return lambda p: Release1833(p, **options)
    release_2 = load_release_2_0_1()
    return lambda p: release_2(p, **options)


class _Model(torch.nn.Module):
    """An MLP of about 34M parameters for the gradient-memory comparison."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def gradient_memory(fused: bool) -> tuple[int, float]:
    """(peak bytes of gradients alive during one training step, seconds per step)."""
    model = _Model()
    params = list(model.parameters())
    optimizer = ProdigyPlusScheduleFree(params)
    peak = [0]

    def track(_: torch.Tensor) -> None:
        alive = sum(q.grad.numel() * q.grad.element_size() for q in params if q.grad is not None)
        peak[0] = max(peak[0], alive)

    for p in params:  # registered before the fused hooks, so each gradient is seen before it is freed
        p.register_post_accumulate_grad_hook(track)
    if fused:
        optimizer.attach_fused_backward()
    x = torch.randn(64, 2048)
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return peak[0], statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 5 if args.quick else 15
    torch.manual_seed(0)
    candidates = peers()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; repeats {repeats}\n")

    header = "| step time, ms (ratio to AdamW foreach) | " + " | ".join(candidates) + " |"
    rows = [header, "|---" * (len(candidates) + 1) + "|"]
    for label, make in (("LoRA 5.2M/320", lora_set), ("dense 29.6M/64", dense_set)):
        for dtype in (torch.float32, torch.bfloat16):
            times = step_times(make, dtype, candidates, repeats)
            base = times["AdamW foreach"]
            cells = [
                f"{times[n] * 1e3:.1f} ({times[n] / base:.2f}x)" if n in times else "" for n in candidates
            ]
            rows.append(f"| {label} {str(dtype).removeprefix('torch.')} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))

    print("\n" + "\n".join(state_memory_table(candidates)))

    plain_peak, plain_time = gradient_memory(fused=False)
    fused_peak, fused_time = gradient_memory(fused=True)
    print("\n| 34M-param MLP, one step | peak gradient memory | step time |\n|---|---|---|")
    print(f"| step() | {plain_peak / 2**20:.1f} MiB | {plain_time * 1e3:.0f} ms |")
    print(
        f"| attach_fused_backward() | {fused_peak / 2**20:.1f} MiB ({fused_peak / plain_peak:.1%}) "
        f"| {fused_time * 1e3:.0f} ms |"
    )


if __name__ == "__main__":
    main()
