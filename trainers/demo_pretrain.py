"""Pretrain the demo's tiny SDXL-shaped model on the base world, so its samples follow their captions.

    nice -n 10 python -m trainers.demo_pretrain            # writes trainers/demo_weights/tiny-sdxl.safetensors

Same classes and configs as trainers/tiny_models.py (the demo://tiny-sdxl pipeline). Seeded throughout: the
text encoders keep their seeded random init (the UNet learns to read them), the VAE learns to encode
shapes of any colour, then the UNet learns the base world (trainers/demo_world.py) with SDXL's epsilon
objective. Weights are stored in fp16 (the model trains on fp16-rounded encoders so nothing shifts on
load). On a busy 2-core CPU the default run takes about 15 minutes; the figures it prints at the end
(how often a sample shows the colours its caption names) are the ones the README quotes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trainers import demo_world
from trainers.tiny_models import DEMO_WEIGHTS, make_tiny_sdxl_pipeline

RESOLUTION = 64
VAE_CROP = 32  # the VAE is convolutional: it learns on 32 px crops at a quarter of the cost
_TARGET_LOGVAR = -6.0  # posterior std 0.05, i.e. 0.007 after scaling: small against latents of std 1
SDXL_PARTS = ("text_encoder", "text_encoder_2", "vae", "unet")


def _pixels(images) -> torch.Tensor:
    """PIL images to a (N, 3, H, W) float tensor in [-1, 1], as the SDXL VAE expects."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _round_to_fp16(module: torch.nn.Module) -> None:
    """Make a module's weights exactly what the fp16 weight file will hold."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(param.half().float())


def train_vae(vae, steps: int, batch_size: int, seed: int, log) -> None:
    """Autoencoder on random-colour shapes; latents * scaling_factor are pushed towards unit variance."""
    images = _pixels(demo_world.random_colour_image(i, seed, RESOLUTION) for i in range(2048))
    generator = torch.Generator().manual_seed(seed)
    scaling = vae.config.scaling_factor
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    vae.train()
    for step in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        top, left = (int(v) for v in torch.randint(0, RESOLUTION - VAE_CROP + 1, (2,), generator=generator))
        batch = images[index][:, :, top : top + VAE_CROP, left : left + VAE_CROP]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        recon = torch.nn.functional.mse_loss(reconstruction, batch)
        # The scale is set on the mean (the noise could otherwise supply it), and the posterior's noise is
        # kept small against it, so the trainer's latent_dist.sample() is nearly the mean.
        scale = (posterior.mean.std() * scaling - 1.0) ** 2
        spread = torch.nn.functional.relu(posterior.logvar - _TARGET_LOGVAR).mean()
        loss = recon + 0.1 * scale + 0.01 * spread
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            mean_std = posterior.mean.std().item() * scaling
            log(f"vae {step:5d}/{steps}  mse {recon.item():.4f}  scaled latent std {mean_std:.2f}")
    vae.eval()


def base_world_data(pipe, count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Latents (scaled, as the trainer caches them) and captions of `count` base-world images."""
    images, captions = zip(*(demo_world.base_image(i, seed) for i in range(count)))
    generator = torch.Generator().manual_seed(seed)
    latents = []
    with torch.no_grad():
        for start in range(0, count, 64):
            posterior = pipe.vae.encode(_pixels(images[start : start + 64])).latent_dist
            latents.append(posterior.sample(generator) * pipe.vae.config.scaling_factor)
    return torch.cat(latents), list(captions)


def caption_variants(caption: str) -> list[str]:
    """The full caption and shorter ones ("a red circle", "a circle"), so short prompts work too."""
    words = caption.split()  # "a red circle on a blue background"
    return [caption, " ".join(words[:3]), f"a {words[2]}"]


def encode_texts(pipe, captions: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    with torch.no_grad():
        for caption in sorted(set(captions)):
            embeds, _, pooled, _ = pipe.encode_prompt(
                caption, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            out[caption] = (embeds[0], pooled[0])
    return out


def train_unet(pipe, latents, captions, steps: int, batch_size: int, seed: int, log) -> None:
    """SDXL's epsilon objective on the base world; 10% of captions dropped to zeros (the pipeline's
    unconditional input for classifier-free guidance)."""
    unet, scheduler = pipe.unet, _noise_scheduler(pipe)
    variants = [caption_variants(c) for c in captions]
    texts = encode_texts(pipe, [v for vs in variants for v in vs])
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    time_ids = torch.tensor(
        [[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]] * batch_size, dtype=torch.float32
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=1e-4)
    warmup = min(100, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)) if warmup else 1.0,
    )
    unet.train()
    recent = []
    for step in range(steps):
        index = [rng.randrange(len(latents)) for _ in range(batch_size)]
        chosen = [rng.choices(variants[i], weights=(6, 2, 2))[0] for i in index]
        embeds = torch.stack([texts[c][0] for c in chosen])
        pooled = torch.stack([texts[c][1] for c in chosen])
        keep = (torch.rand(batch_size, generator=generator) >= 0.1).float()
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(
            noisy, timesteps, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 100 == 0 or step == steps - 1:
            log(f"unet {step:5d}/{steps}  loss (last 50) {sum(recent) / len(recent):.4f}")
    unet.eval()


def _noise_scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def caption_follow_rate(pipe, count: int = 16, seed: int = 1000, steps: int = 10) -> float:
    """Share of samples of held-out base-world captions whose named shape colour and background colour
    both appear (>= 4% and >= 30% of the pixels): the base model's "it follows the caption" figure."""
    pipe.set_progress_bar_config(disable=True)
    hits = 0
    for index in range(count):
        scene = demo_world.base_scene(index, seed)
        generator = torch.Generator().manual_seed(index)
        image = pipe(
            scene.caption,
            num_inference_steps=steps,
            guidance_scale=4.0,
            height=RESOLUTION,
            width=RESOLUTION,
            generator=generator,
        ).images[0]
        background = demo_world.colour_fraction(image, scene.background)
        shape = demo_world.colour_fraction(image, scene.colour)
        hits += background >= 0.3 and shape >= 0.04
    return hits / count


def save_weights(pipe, path: Path, metadata: dict[str, str]) -> None:
    """All four modules' weights in one fp16 safetensors file, keys prefixed by the module's name."""
    from safetensors.torch import save_file

    from trainers.atomic import atomic_write

    tensors = {
        f"{part}.{key}": value.detach().half().contiguous()
        for part in SDXL_PARTS
        for key, value in getattr(pipe, part).state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEMO_WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument("--images", type=int, default=4096, help="base-world images the UNet learns from")
    parser.add_argument("--threads", type=int, default=1, help="one is fastest on a busy CPU")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    torch.manual_seed(args.seed)
    pipe = make_tiny_sdxl_pipeline(seed=args.seed, pretrained=False)
    for part in ("text_encoder", "text_encoder_2"):
        _round_to_fp16(getattr(pipe, part))
    train_vae(pipe.vae, args.vae_steps, 16, args.seed, log)
    _round_to_fp16(pipe.vae)
    latents, captions = base_world_data(pipe, args.images, args.seed)
    log(f"encoded {len(latents)} base-world images; latent std {latents.std().item():.2f}")
    random_rate = caption_follow_rate(pipe)
    train_unet(pipe, latents, captions, args.unet_steps, 32, args.seed, log)
    _round_to_fp16(pipe.unet)
    rate = caption_follow_rate(pipe)
    log(f"samples that show their caption's colours: {rate:.0%} (random UNet: {random_rate:.0%})")
    command = f"python -m trainers.demo_pretrain --seed {args.seed} --vae-steps {args.vae_steps} " + (
        f"--unet-steps {args.unet_steps} --images {args.images}"
    )
    metadata = {
        "command": command,
        "caption_follow_rate": f"{rate:.3f}",
        "random_caption_follow_rate": f"{random_rate:.3f}",
        "seconds": f"{time.perf_counter() - started:.0f}",
        "configs": json.dumps({"note": "architecture: trainers/tiny_models.py"}),
    }
    save_weights(pipe, args.output, metadata)
    log(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
