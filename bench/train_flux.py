"""Trainer overhead on the tiny Flux.1-dev model (CPU), with and without the int8 base, in one run.

    python bench/train_flux.py [--steps 200]

Rows: this trainer (fused backward pass, the default) against a minimal hand-written diffusers flow-matching
loop on the same model, LoRA targets and cached data with torch AdamW(foreach): the floor a trainer cannot
beat (no events, checkpoints, telemetry or progress bar). Each pair runs with an fp32 base and with a torchao
int8 weight-only base. Steps per second are the median over steps after a warm-up.

On a shared machine one pair of runs swings by ±20% and more (another job takes the core for a few seconds),
so steps are timed in this process's CPU seconds (`--clock cpu`, the default; `--clock wall` for elapsed
time) and the two sides run interleaved: `--rounds` rounds, each running every base's loop and trainer
back to back (the order alternating between rounds); the table gives the median of the per-round ratios
and their range.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainers import train as training  # noqa: E402
from trainers.config import validate_config  # noqa: E402
from trainers.dataset import load_image, scan_dataset  # noqa: E402
from trainers.events import read_events  # noqa: E402
from trainers.models.flux import T5_TOKENS, TARGET_SETS  # noqa: E402
from trainers.tiny_flux import build_tiny_flux  # noqa: E402
from trainers.tiny_models import write_demo_dataset  # noqa: E402

WARMUP = 20
BATCH = 2


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def trainer_run(folder: Path, dataset: Path, steps: int, quantize: str) -> float:
    """Median seconds per step of the real trainer on demo://tiny-flux (its `_train_step`: forward,
    backward and optimizer, the span its step_seconds event reports)."""
    config = validate_config(
        {
            "name": f"bench-{quantize}",
            "output_dir": str(folder),
            "model": {"family": "flux", "path": "demo://tiny-flux"},
            "dataset": {"path": str(dataset), "resolution": 64},
            "lora": {"rank": 8, "alpha": 8},
            "training": {"max_steps": steps, "batch_size": BATCH, "precision": "fp32", "seed": 1},
            "saving": {"every_n_steps": 0, "formats": ["diffusers"]},
            "flux": {"quantize_base": quantize},
        }
    )
    seconds = []
    train_step = training.Trainer._train_step

    def timed(self, run):
        start = clock()
        result = train_step(self, run)
        seconds.append(clock() - start)
        return result

    training.Trainer._train_step = timed
    try:
        run_dir = training.train(config)
    finally:
        training.Trainer._train_step = train_step
    assert len([e for e in read_events(run_dir) if e["type"] == "step"]) == steps == len(seconds)
    return statistics.median(seconds[WARMUP:])


def minimal_loop(model: Path, dataset: Path, steps: int, quantize: str) -> float:
    """Median seconds per step of a bare diffusers flow-matching LoRA loop with AdamW on pre-encoded data."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, inject_adapter_in_model

    pipe = FluxPipeline.from_pretrained(model, local_files_only=True)
    transformer = pipe.transformer.requires_grad_(False)
    if quantize == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(transformer, Int8WeightOnlyConfig(), filter_fn=lambda m, name: (
            isinstance(m, torch.nn.Linear) and "transformer_blocks." in name))  # fmt: skip
    inject_adapter_in_model(
        LoraConfig(r=8, lora_alpha=8, target_modules=TARGET_SETS["attention+mlp"]), transformer
    )
    params = [p for p in transformer.parameters() if p.requires_grad]
    for param in params:
        param.data = param.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    items = scan_dataset(dataset).items
    vae = pipe.vae.config
    with torch.no_grad():
        pixels = torch.stack([load_image(i.path, (64, 64), "center", random.Random(0)).pixels for i in items])
        latents = (pipe.vae.encode(pixels).latent_dist.sample() - vae.shift_factor) * vae.scaling_factor
        embeds, pooled, text_ids = pipe.encode_prompt(
            [i.caption for i in items],
            None,
            device="cpu",
            # the trainer's length: dev's 512 T5 tokens, or fewer where the tokenizer stops sooner
            max_sequence_length=min(T5_TOKENS["dev"], pipe.tokenizer_2.model_max_length),
        )
    _, channels, height, width = latents.shape
    image_ids = FluxPipeline._prepare_latent_image_ids(BATCH, height // 2, width // 2, "cpu", torch.float32)
    tokens = (height // 2) * (width // 2)
    shift = math.exp(0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256))  # Flux.1's linear resolution shift
    guidance = torch.full((BATCH,), 1.0)
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(steps):
        start = clock()
        batch = torch.randint(0, len(items), (BATCH,), generator=generator)
        x0 = latents[batch]
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(BATCH, generator=generator))
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
        noisy = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        prediction = transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, BATCH, channels, height, width),
            timestep=sigma,
            guidance=guidance,
            pooled_projections=pooled[batch],
            encoder_hidden_states=embeds[batch],
            txt_ids=text_ids,
            img_ids=image_ids,
        ).sample
        target = FluxPipeline._pack_latents(noise - x0, BATCH, channels, height, width)
        torch.nn.functional.mse_loss(prediction, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(clock() - start)
    return statistics.median(seconds[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: this process's CPU seconds per step (what other jobs on a shared machine disturb least); "
        "wall: elapsed seconds",
    )
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(1)  # the tiny model is dominated by per-op overhead; threads only add noise
    bases = ("none", "int8")
    seconds: dict[tuple[str, str], list[float]] = {(b, side): [] for b in bases for side in ("loop", "ours")}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["PPSF_DEMO_DIR"] = str(folder / "demo")
        model = build_tiny_flux(folder / "demo" / "tiny-flux")
        dataset = write_demo_dataset(folder / "data", num_images=12)
        for round_index in range(args.rounds):
            for quantize in bases:
                sides = ("loop", "ours") if round_index % 2 == 0 else ("ours", "loop")
                for side in sides:
                    if side == "loop":
                        result = minimal_loop(model, dataset, args.steps, quantize)
                    else:
                        runs = folder / f"runs-{round_index}"
                        result = trainer_run(runs, dataset, args.steps, quantize)
                    seconds[(quantize, side)].append(result)
                loop, ours = seconds[(quantize, "loop")][-1], seconds[(quantize, "ours")][-1]
                print(f"round {round_index + 1} {quantize}: loop {1 / loop:.1f}, ours {1 / ours:.1f} steps/s, "
                      f"ratio {loop / ours:.2f}", file=sys.stderr)  # fmt: skip
    print(
        f"\ntiny Flux.1-dev, 64 px, batch {BATCH}, LoRA rank 8 (attention+mlp), {args.steps} steps, CPU, "
        f"1 thread, {args.rounds} interleaved rounds, {args.clock} time per step\n"
    )
    print("| base | minimal loop steps/s | ppsf-trainer steps/s | ratio (median) | ratio range |")
    print("|---|---|---|---|---|")
    for quantize in bases:
        loops, ours = seconds[(quantize, "loop")], seconds[(quantize, "ours")]
        ratios = [a / b for a, b in zip(loops, ours)]
        name = "fp32" if quantize == "none" else "int8 (torchao)"
        print(
            f"| {name} | {1 / statistics.median(loops):.1f} | {1 / statistics.median(ours):.1f} | "
            f"{statistics.median(ratios):.2f}x | {min(ratios):.2f}–{max(ratios):.2f}x |"
        )


if __name__ == "__main__":
    main()
