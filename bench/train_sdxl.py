"""Trainer overhead and fused-backward gradient memory on the tiny SDXL model (CPU), in one run.

    python bench/train_sdxl.py [--steps 200]

Rows:
- this trainer (ppsf_optim, fused backward pass on, the default) and with it off;
- a minimal hand-written loop on the same model, LoRA and cached data with torch AdamW(foreach): the
  floor a trainer cannot beat (no events, checkpoints, telemetry or progress bar).
Steps per second are the median over steps after a warm-up. "Gradients held" is the LoRA gradient memory
still allocated when the backward pass ends (what the fused pass frees as it goes).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ppsf_optim import ProdigyPlusScheduleFree  # noqa: E402
from trainers import train as training  # noqa: E402
from trainers.config import validate_config  # noqa: E402
from trainers.dataset import load_image, scan_dataset  # noqa: E402
from trainers.events import read_events  # noqa: E402
from trainers.tiny_models import build_tiny_sdxl, write_demo_dataset  # noqa: E402

WARMUP = 20


def trainer_run(folder: Path, model: Path, dataset: Path, steps: int, fused: bool) -> tuple[float, int]:
    """(median seconds per step, LoRA gradient bytes held at the end of backward) of the real trainer."""
    held = []
    original_step = ProdigyPlusScheduleFree.step

    def recording_step(self, closure=None):  # called right after backward in both modes
        held.append(sum(p.grad.nbytes for g in self.param_groups for p in g["params"] if p.grad is not None))
        return original_step(self, closure)

    ProdigyPlusScheduleFree.step = recording_step
    try:
        config = validate_config(
            {
                "name": f"bench-{'fused' if fused else 'plain'}",
                "output_dir": str(folder),
                "model": {"path": str(model)},
                "dataset": {"path": str(dataset), "resolution": 64},
                "lora": {"rank": 8, "alpha": 8},
                "training": {"max_steps": steps, "batch_size": 2, "precision": "fp32", "seed": 1},
                "optimizer": {"fused_back_pass": fused},
                "saving": {"every_n_steps": 0, "formats": ["kohya"]},
            }
        )
        run_dir = training.train(config)
    finally:
        ProdigyPlusScheduleFree.step = original_step
    seconds = [e["step_seconds"] for e in read_events(run_dir) if e["type"] == "step"][WARMUP:]
    return statistics.median(seconds), max(held)


def minimal_loop(model: Path, dataset: Path, steps: int) -> float:
    """Median seconds per step of a bare diffusers LoRA loop with AdamW on pre-encoded data."""
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model

    pipe = StableDiffusionXLPipeline.from_pretrained(model, local_files_only=True)
    unet = pipe.unet.requires_grad_(False)
    inject_adapter_in_model(
        LoraConfig(r=8, lora_alpha=8, target_modules=["to_k", "to_q", "to_v", "to_out.0"]), unet
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    items = scan_dataset(dataset).items
    with torch.no_grad():
        pixels = torch.stack([load_image(i.path, (64, 64), "center", random.Random(0)).pixels for i in items])
        latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(
            [i.caption for i in items], device="cpu", do_classifier_free_guidance=False
        )
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        batch = torch.randint(0, len(items), (2,), generator=generator)
        noise = torch.randn(latents[batch].shape, generator=generator)
        t = torch.randint(0, 1000, (2,), generator=generator)
        prediction = unet(
            scheduler.add_noise(latents[batch], noise, t),
            t,
            encoder_hidden_states=embeds[batch],
            added_cond_kwargs={"text_embeds": pooled[batch], "time_ids": time_ids},
        ).sample
        torch.nn.functional.mse_loss(prediction, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the tiny model is dominated by per-op overhead; threads only add noise
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = build_tiny_sdxl(folder / "tiny-sdxl")
        dataset = write_demo_dataset(folder / "data", num_images=12)
        loop = minimal_loop(model, dataset, args.steps)
        fused, fused_held = trainer_run(folder / "runs", model, dataset, args.steps, fused=True)
        plain, plain_held = trainer_run(folder / "runs", model, dataset, args.steps, fused=False)
    print(f"\ntiny SDXL, 64 px, batch 2, LoRA rank 8, {args.steps} steps, CPU, 1 thread\n")
    print("| loop | steps/s | vs minimal loop | LoRA gradients held after backward |")
    print("|---|---|---|---|")
    print(f"| minimal loop, torch AdamW | {1 / loop:.1f} | 1.00x | (all) |")
    print(
        f"| ppsf-trainer, fused backward (default) | {1 / fused:.1f} | {loop / fused:.2f}x | {fused_held} B |"
    )
    print(
        f"| ppsf-trainer, plain step() | {1 / plain:.1f} | {loop / plain:.2f}x | {plain_held / 1024:.1f} KiB |"
    )


if __name__ == "__main__":
    main()
