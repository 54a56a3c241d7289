"""Pretrain the Flux demos' tiny transformers on the base world, so their samples follow their captions.

    nice -n 10 python -m trainers.demo_pretrain_flux --family flux    # trainers/demo_weights/tiny-flux.safetensors
    nice -n 10 python -m trainers.demo_pretrain_flux --family flux2   # trainers/demo_weights/tiny-klein.safetensors

The Flux.1 and Flux.2 Klein counterpart of trainers/demo_pretrain.py (the SDXL demo), with the same classes
and configs as trainers/tiny_flux.py (the demo://tiny-flux and demo://tiny-klein pipelines). Seeded
throughout: the text encoders keep their seeded random init (the transformer learns to read them), the VAE is
set to the exact 8x8 colour mosaic codec of the SDXL demo (Klein's latent BatchNorm statistics fitted to the
base world), then the whole transformer learns the base world (trainers/demo_world.py) with AdamW on the
adapter's own flow-matching objective (`training_loss`, with the demo preset's `[flux]` options: the same
timestep distribution the demo's LoRA then trains with). Nothing here depends on the family: the adapter
encodes the images and captions and computes the loss. Weights are stored in fp16, and the transformer
trains on fp16-rounded encoders and VAE, so nothing shifts on load. The caption-follow rate it prints at the
end (samples through the adapter's `sample`, with the demo preset's sample settings) is stored in the file's
metadata with the command and the time it took. Measured with the defaults (the shipped files): Flux.1 4500
steps in 680 s (caption-follow 88%), Klein 4000 steps in 1265 s (100%, with CFG 4), on a busy shared 2-core
CPU with `nice -n 10` and one thread; the random transformer: 0% for both.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from trainers import demo_world
from trainers.demo_pretrain import (
    _pixels,
    _round_to_fp16,
    caption_variants,
    save_weights,
    set_mosaic_vae,
)
from trainers.tiny_flux import (
    DEMO_FLUX_TRANSFORMER_CONFIG,
    DEMO_FLUX_VAE_CONFIG,
    DEMO_FLUX_WEIGHTS,
    DEMO_KLEIN_TRANSFORMER_CONFIG,
    DEMO_KLEIN_VAE_CONFIG,
    DEMO_KLEIN_WEIGHTS,
    FLUX_PARTS,
    KLEIN_PARTS,
    assemble_flux,
    assemble_klein,
)

PRESETS = Path(__file__).resolve().parents[1] / "presets"
RESOLUTION = 64
# Unscaled latent = 4 x colour in [-1, 1]: with Flux.1's (z - 0.1159) x 0.3611 about unit range (Klein's
# BatchNorm statistics normalise whatever the gain). A power of two: exact in fp16.
LATENT_GAIN = 4.0
CAPTION_DROPOUT = 0.1  # the empty caption: Klein base's unconditional input for classifier-free guidance


def _fit_latent_batchnorm(vae, pixels: torch.Tensor) -> None:
    """Klein's latents are normalised by the VAE's BatchNorm running statistics: set them to the per-channel
    mean and variance of the patchified mosaic latents of `pixels` (channels that carry no colour: 0 and 1),
    rounded to fp16 as the weight file stores them."""
    from diffusers import Flux2KleinPipeline

    with torch.no_grad():
        latents = Flux2KleinPipeline._patchify_latents(vae.encode(pixels).latent_dist.mode())
        mean = latents.mean(dim=(0, 2, 3))
        var = latents.var(dim=(0, 2, 3))
        empty = var < 1e-6
        mean[empty], var[empty] = 0.0, 1.0
        vae.bn.running_mean.copy_(mean.half().float())
        vae.bn.running_var.copy_(var.half().float())


@dataclass(frozen=True)
class DemoModel:
    """What differs between the families: how the pipeline is made, the preset, the file, the VAE's extra."""

    make: Callable  # seed -> the demo architecture with random weights
    preset: Path
    output: Path
    parts: tuple[str, ...]
    steps: int  # what the shipped file was trained for: about 11 and 21 minutes on one busy CPU thread
    fit_vae: Callable | None = None  # (vae, pixels) -> None, after the mosaic weights are set


DEMO_MODELS: dict[str, DemoModel] = {
    "flux": DemoModel(
        lambda seed: assemble_flux(seed, True, DEMO_FLUX_VAE_CONFIG, DEMO_FLUX_TRANSFORMER_CONFIG),
        PRESETS / "demo-flux.toml",
        DEMO_FLUX_WEIGHTS,
        FLUX_PARTS,
        4500,
    ),
    "flux2": DemoModel(
        lambda seed: assemble_klein(seed, False, DEMO_KLEIN_VAE_CONFIG, DEMO_KLEIN_TRANSFORMER_CONFIG),
        PRESETS / "demo-flux2.toml",
        DEMO_KLEIN_WEIGHTS,
        KLEIN_PARTS,
        4000,
        _fit_latent_batchnorm,
    ),
}


def make_base(family: str, seed: int):
    """The family's tiny pipeline with the demo's encoders: seeded random text encoders rounded to fp16, the
    mosaic VAE; the transformer is still the random init."""
    demo = DEMO_MODELS[family]
    pipe = demo.make(seed)
    for part in demo.parts:
        if part.startswith("text_encoder"):
            _round_to_fp16(getattr(pipe, part))
    set_mosaic_vae(pipe.vae, LATENT_GAIN)
    if demo.fit_vae is not None:
        images = [demo_world.base_image(i, seed)[0] for i in range(512)]
        demo.fit_vae(pipe.vae, _pixels(images))
    _round_to_fp16(pipe.vae)
    return pipe


def make_adapter(family: str, pipe):
    """The family's real adapter, configured by the demo preset, around the in-memory `pipe`."""
    from trainers.config import load_config
    from trainers.models import adapter_for

    config = load_config(DEMO_MODELS[family].preset)
    adapter = adapter_for(config.model.family)(config, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    adapter.pipe = pipe
    return adapter


def base_world_latents(adapter, count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """The adapter's latents (as the trainer caches them) and the captions of `count` base-world images."""
    images, captions = zip(*(demo_world.base_image(i, seed) for i in range(count)))
    generator = torch.Generator().manual_seed(seed)
    latents = [
        adapter.encode_images(_pixels(images[start : start + 64]), generator) for start in range(0, count, 64)
    ]
    return torch.cat(latents), list(captions)


def encode_texts(adapter, captions: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each distinct caption's text conditioning (batch of one), as the trainer caches it."""
    with torch.no_grad():
        return {caption: adapter.encode_captions([caption]) for caption in sorted(set(captions))}


def _stack(texts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([text[key] for text in texts]) for key in texts[0]}


def train_transformer(adapter, latents, captions, steps: int, batch_size: int, lr: float, seed: int, log):
    """The adapter's flow-matching loss on the base world, all transformer weights trained with AdamW
    (warmup, then cosine). Captions vary in length ("a red circle on a blue background", "a red circle",
    "a circle"), and CAPTION_DROPOUT of them are empty."""
    transformer = adapter.pipe.transformer
    variants = [caption_variants(c) for c in captions]
    texts = encode_texts(adapter, [v for vs in variants for v in vs] + [""])
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    transformer.requires_grad_(True)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, min(100, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    transformer.train()
    recent: list[float] = []
    for step in range(steps):
        index = [rng.randrange(len(latents)) for _ in range(batch_size)]
        chosen = [
            "" if rng.random() < CAPTION_DROPOUT else rng.choices(variants[i], weights=(6, 2, 2))[0]
            for i in index
        ]
        loss = adapter.training_loss(latents[index], _stack([texts[c] for c in chosen]), None, generator)
        loss = loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 100 == 0 or step == steps - 1:
            log(f"transformer {step:5d}/{steps}  loss (last 50) {sum(recent) / len(recent):.4f}")
    transformer.eval()
    transformer.requires_grad_(False)


def caption_follow_rate(adapter, count: int = 16, seed: int = 1000) -> float:
    """Share of samples of held-out base-world captions whose named shape colour and background colour both
    appear (>= 4% and >= 30% of the pixels), sampled as the demo preset samples (the adapter's `sample`)."""
    scenes = [demo_world.base_scene(index, seed) for index in range(count)]
    images = adapter.sample([scene.caption for scene in scenes], seed=0)
    hits = 0
    for scene, image in zip(scenes, images):
        background = demo_world.colour_fraction(image, scene.background)
        shape = demo_world.colour_fraction(image, scene.colour)
        hits += background >= 0.3 and shape >= 0.04
    return hits / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(DEMO_MODELS), required=True)
    parser.add_argument("--output", type=Path, help="default: the family's file in trainers/demo_weights/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="default: what the shipped file was trained for")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--images", type=int, default=4096, help="base-world images the transformer learns from"
    )
    parser.add_argument("--threads", type=int, default=1, help="one is fastest on a busy CPU")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    output = args.output or DEMO_MODELS[args.family].output
    steps = args.steps or DEMO_MODELS[args.family].steps
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    torch.manual_seed(args.seed)
    pipe = make_base(args.family, args.seed)
    adapter = make_adapter(args.family, pipe)
    latents, captions = base_world_latents(adapter, args.images, args.seed)
    log(
        f"encoded {len(latents)} base-world images; latent mean {latents.mean():.2f}, std {latents.std():.2f}"
    )
    random_rate = caption_follow_rate(adapter)
    train_transformer(adapter, latents, captions, steps, args.batch_size, args.lr, args.seed, log)
    _round_to_fp16(pipe.transformer)
    rate = caption_follow_rate(adapter)
    log(f"samples that show their caption's colours: {rate:.0%} (random transformer: {random_rate:.0%})")
    command = (
        f"python -m trainers.demo_pretrain_flux --family {args.family} --seed {args.seed} --steps {steps} "
        f"--batch-size {args.batch_size} --lr {args.lr:g} --images {args.images}"
    )
    metadata = {
        "command": command,
        "caption_follow_rate": f"{rate:.3f}",
        "random_caption_follow_rate": f"{random_rate:.3f}",
        "seconds": f"{time.perf_counter() - started:.0f}",
        "architecture": "trainers/tiny_flux.py",
    }
    save_weights(pipe, DEMO_MODELS[args.family].parts, output, metadata)
    log(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
