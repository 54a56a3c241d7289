"""Pretrain the demo's tiny SDXL-shaped model on the base world, so its samples follow their captions.

    nice -n 10 python -m trainers.demo_pretrain            # writes trainers/demo_weights/tiny-sdxl.safetensors

Same classes and configs as trainers/tiny_models.py (the demo://tiny-sdxl pipeline). Seeded throughout: the
text encoders keep their seeded random init (the UNet learns to read them), the VAE is set to an exact 8x8
colour mosaic codec (set_mosaic_vae), then the UNet learns the base world (trainers/demo_world.py) with
SDXL's epsilon objective. Weights are stored in fp16, and the UNet trains on fp16-rounded encoders and VAE,
so nothing shifts on load. Measured: 646 s (11 min) on a busy shared 2-core CPU (load about 3) with `nice`
and one thread. The figure it prints at the end (how often a sample shows the colours its caption names) is the one
the README quotes; it is stored in the file's metadata with the command.
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


# Constants of the mosaic VAE below: a constant channel pair (+-_BIG) fixes every GroupNorm's statistics, and
# _SHIFT keeps colours on the linear side of SiLU. Powers of two and small integers: exact in fp16.
_BIG = 1024.0
_SHIFT = 20.0
_LATENT_GAIN = 8.0  # unscaled latent = 8 * colour in [-1, 1]; times scaling_factor 0.13025: about unit range


def set_mosaic_vae(vae, latent_gain: float = _LATENT_GAIN) -> None:
    """Give the AutoencoderKL (or AutoencoderKLFlux2: same encoder and decoder) weights that make it an exact
    8x8 colour mosaic codec: unscaled latent channels 0-2 = `latent_gain` x the block's RGB in [-1, 1].

    The encoder averages each 8x8 pixel block (latent channels 0-2 = the block's RGB, channel 3 = 0); the
    decoder repeats each latent pixel over its block. Every ResNet and attention block adds zero (their
    last layer is zero), the samplers are plain averaging / nearest repeats, and the GroupNorms see a
    channel pair held at +-1024 beside the colours, so their mean is exactly 0 and their scale a constant:
    colours pass through unchanged. A tiny conv VAE trained from scratch needs far more than this
    machine's minutes to learn colours this exactly; this keeps AutoencoderKL and its loading path real.
    """
    with torch.no_grad():
        for param in vae.parameters():
            param.zero_()
        for module in vae.modules():
            name = type(module).__name__
            if name == "GroupNorm":
                module.weight.zero_()
            if name == "Downsample2D":
                module.conv.weight[:, :, 0:2, 0:2] = (
                    0.25 * torch.eye(module.conv.weight.shape[0])[:, :, None, None]
                )
            if name == "Upsample2D":
                module.conv.weight[:, :, 1, 1] = torch.eye(module.conv.weight.shape[0])
        _colour_carrier(vae.encoder.conv_in, vae.encoder.conv_norm_out, in_gain=1.0)
        _colour_carrier(vae.decoder.conv_in, vae.decoder.conv_norm_out, in_gain=latent_gain)
        encoder_out = vae.encoder.conv_out
        for channel in range(3):
            encoder_out.weight[channel, channel, 1, 1] = latent_gain
            encoder_out.bias[channel] = -_SHIFT * latent_gain
        latent_channels = vae.config.latent_channels
        encoder_out.bias[latent_channels:] = -30.0  # log-variance: the posterior's noise is exp(-15)
        decoder_out = vae.decoder.conv_out
        for channel in range(3):
            decoder_out.weight[channel, channel, 1, 1] = 1.0
            decoder_out.bias[channel] = -_SHIFT
        for conv in (vae.quant_conv, vae.post_quant_conv):
            if conv is not None:  # Flux.1's VAE has none
                conv.weight[:, :, 0, 0] = torch.eye(conv.weight.shape[0])


def _colour_carrier(conv_in, norm_out, in_gain: float) -> None:
    """conv_in: channels 0-2 copy the colour (input channels 0-2, worth `in_gain` per unit of colour),
    channel 3 is minus their sum and channels 4/5 are +-_BIG, so each pixel's channels sum to zero.
    norm_out: GroupNorm divides by a standard deviation of _BIG/2 (to within 5e-5); its affine turns
    channels 0-2 back into colour + _SHIFT and silences the rest."""
    for channel in range(3):
        conv_in.weight[channel, channel, 1, 1] = 1.0
        conv_in.weight[3, channel, 1, 1] = -1.0
    conv_in.bias[4], conv_in.bias[5] = _BIG, -_BIG
    norm_out.weight[:3] = _BIG / 2 / in_gain
    norm_out.bias[:3] = _SHIFT


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


def save_weights(pipe, parts: tuple[str, ...], path: Path, metadata: dict[str, str]) -> None:
    """The modules' weights (buffers included: Klein's BatchNorm statistics) in one fp16 safetensors file,
    keys prefixed by the module's name."""
    from safetensors.torch import save_file

    from trainers.atomic import atomic_write

    tensors = {
        f"{part}.{key}": value.detach().half().contiguous()
        for part in parts
        for key, value in getattr(pipe, part).state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEMO_WEIGHTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--images", type=int, default=4096, help="base-world images the UNet learns from")
    parser.add_argument("--threads", type=int, default=1, help="one is fastest on a busy CPU")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    torch.manual_seed(args.seed)
    pipe = make_tiny_sdxl_pipeline(seed=args.seed, demo_architecture=True)
    for part in ("text_encoder", "text_encoder_2"):
        _round_to_fp16(getattr(pipe, part))
    set_mosaic_vae(pipe.vae)
    latents, captions = base_world_data(pipe, args.images, args.seed)
    log(f"encoded {len(latents)} base-world images; latent std {latents.std().item():.2f}")
    random_rate = caption_follow_rate(pipe)
    train_unet(pipe, latents, captions, args.unet_steps, 32, args.seed, log)
    _round_to_fp16(pipe.unet)
    rate = caption_follow_rate(pipe)
    log(f"samples that show their caption's colours: {rate:.0%} (random UNet: {random_rate:.0%})")
    command = f"python -m trainers.demo_pretrain --seed {args.seed} " + (
        f"--unet-steps {args.unet_steps} --images {args.images}"
    )
    metadata = {
        "command": command,
        "caption_follow_rate": f"{rate:.3f}",
        "random_caption_follow_rate": f"{random_rate:.3f}",
        "seconds": f"{time.perf_counter() - started:.0f}",
        "configs": json.dumps({"note": "architecture: trainers/tiny_models.py"}),
    }
    save_weights(pipe, SDXL_PARTS, args.output, metadata)
    log(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
