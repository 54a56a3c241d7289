"""Step time of 1 process against N processes (accelerate launch, DDP) on the tiny SDXL model.

    python bench/multiproc.py [--steps 40] [--processes 2] [--batch-size 2] [--fused]

Each process trains `--batch-size` samples per step, so N processes make a global batch N times larger:
perfect scaling keeps the step time and multiplies samples/s by N. Step times are the medians of the
trainer's own `step_seconds` (forward, backward, all-reduce, optimizer, the per-step agreement on loss and
stop) after a warm-up; samples/s counts the samples of all processes.

On a CPU machine every process gets one thread (OMP_NUM_THREADS=1) and the processes share the cores
(and, here, the machine with other people): the table then shows the overhead of DDP (gloo all-reduce
of the LoRA gradients, the extra per-step all-reduces, process start-up not counted) and not a speed-up.
On a machine with N GPUs each process gets one GPU (nccl) and the table shows the scaling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import tomli_w
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from trainers.distributed import free_port, launch_command  # noqa: E402
from trainers.events import read_events  # noqa: E402
from trainers.tiny_models import build_tiny_sdxl, write_demo_dataset  # noqa: E402

WARMUP = 5


def run(folder: Path, model: Path, dataset: Path, processes: int, args: argparse.Namespace) -> list[dict]:
    """The step events of one run on `processes` processes."""
    config = {
        "name": f"p{processes}",
        "output_dir": str(folder / "runs"),
        "model": {"path": str(model)},
        "dataset": {"path": str(dataset), "resolution": 64, "trigger_word": "shapes"},
        "lora": {"rank": 4, "alpha": 8},
        "training": {"max_steps": args.steps, "batch_size": args.batch_size, "precision": "fp32"},
        "optimizer": {"d0": 1e-4, "fused_back_pass": args.fused},
        "sampling": {"prompts": []},
        "saving": {"every_n_steps": 0, "formats": ["kohya"]},
    }
    path = folder / f"p{processes}.toml"
    path.write_text(tomli_w.dumps(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    if processes == 1:
        command = [sys.executable, "-m", "trainers", "train", str(path)]
    else:
        command = launch_command(["train", str(path)], processes, free_port())
    subprocess.run(command, env=env, cwd=REPO, check=True, capture_output=True, timeout=1800)
    return [e for e in read_events(folder / "runs" / f"p{processes}") if e["type"] == "step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--fused", action="store_true", help="the fused backward pass (default: off)")
    args = parser.parse_args()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = f"{gpus} GPU(s), nccl" if gpus >= args.processes else f"CPU ({os.cpu_count()} cores), gloo"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build_tiny_sdxl(folder / "model")
        dataset = write_demo_dataset(folder / "data", num_images=8)
        rows = []
        for processes in (1, args.processes):
            events = run(folder, model, dataset, processes, args)[WARMUP:]
            seconds = statistics.median(e["step_seconds"] for e in events)
            samples = events[-1]["samples"]
            rows.append((processes, samples, seconds, samples / seconds))
    print(
        f"tiny SDXL, {args.steps} steps ({WARMUP} warm-up), fused pass {'on' if args.fused else 'off'}, {device}"
    )
    print("| processes | global batch | median step (s) | samples/s | samples/s vs 1 process |")
    print("|---|---|---|---|---|")
    for processes, samples, seconds, rate in rows:
        print(f"| {processes} | {samples} | {seconds:.4f} | {rate:.1f} | {rate / rows[0][3]:.2f}x |")


if __name__ == "__main__":
    main()
