"""Validation loss of the weights that get exported, on images the run does not train on.

With schedule-free the training loss is measured at the training point y, but the exported LoRA is the
average x. Every evaluation switches the optimizer to eval mode (x), computes the family's own training
objective on the validation images at fixed noise and at fixed timesteps spread over the training schedule,
then puts the parameters back bit for bit. Nothing here draws from an RNG the training uses, so a run with
validation trains exactly as one without, and the same evaluation gives the same number every time, in
every run on the same images, and after a resume.

The images: `dataset.validation` as a folder (laid out like the dataset), or a fraction of the dataset held
out with a fixed seed (the same images whatever `training.seed` is, so runs compare); which ones is
trainers/validation_images.py's to say (`check` reads it without torch).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from trainers.cache import TensorCache, file_digest, latent_key, text_key
from trainers.config import TrainConfig
from trainers.dataset import (
    DatasetError,
    ImageItem,
    assign_buckets,
    load_image,
    process_caption,
)
from trainers.models import ModelAdapter, SampleConditioning
from trainers.validation_images import split_dataset, validation_items  # noqa: F401  (train.py imports split_dataset here)

NOISE_SEED = 1_234_567  # the noise of validation sample (image i, timestep j) is drawn from this + (i, j)
VALIDATION_CROP = "center"  # one fixed crop per image, whatever dataset.crop is


def timestep_quantiles(images: int, per_image: int) -> list[list[float]]:
    """Quantile (0, 1) of the training timestep distribution for each image's fixed timesteps.

    Image i of N gets the per_image quantiles (j + (i + 0.5) / N) / per_image: each image sees the whole
    schedule, and together the images cover it N * per_image times more finely than one image would.
    """
    return [[(j + (i + 0.5) / images) / per_image for j in range(per_image)] for i in range(images)]


@dataclass
class _Entry:
    """One validation image, ready for the denoiser."""

    latents: torch.Tensor  # on the CPU
    conditioning: SampleConditioning
    caption: str
    text: dict[str, torch.Tensor] | None  # None while text encoders train: encoded at each evaluation
    noise: list[torch.Tensor]  # one per fixed timestep
    quantiles: list[float]


class Validator:
    """Computes the validation loss at x and keeps the best step; writes `validation` events."""

    def __init__(self, config: TrainConfig, items: list[ImageItem]) -> None:
        self.config = config
        self.items = sorted(items, key=lambda item: str(item.path))
        self.every = config.validation.every_n_steps
        self.entries: list[_Entry] = []
        self.best_step: int | None = None
        self.best_loss = math.inf

    # ------------------------------------------------------------------ preparing
    def prepare(self, adapter: ModelAdapter, latents: TensorCache | None, texts: TensorCache | None) -> None:
        """Encode each image and caption once (the run's caches are read and filled), and draw the fixed
        noise. Needs the encoders on the device: call before adapter.offload_encoders()."""
        dataset = self.config.dataset
        buckets = assign_buckets(self.items, dataset.resolution, dataset.max_aspect, dataset.no_upscale)
        quantiles = timestep_quantiles(len(self.items), self.config.validation.timesteps)
        fixed_text = not self.config.lora.train_text_encoder
        for index, (item, bucket) in enumerate(zip(self.items, buckets)):
            entry = self._latents(adapter, item, bucket, latents)
            caption = process_caption(
                item.caption,
                trigger_word=dataset.trigger_word,
                shuffle_tags=False,
                keep_tokens=0,
                caption_dropout=0.0,
                rng=random.Random(0),
            )
            text = self._text(adapter, caption, texts) if fixed_text else None
            c = entry["conditioning"].tolist()
            self.entries.append(
                _Entry(
                    latents=entry["latents"].cpu(),
                    conditioning=SampleConditioning(tuple(c[0:2]), tuple(c[2:4]), tuple(c[4:6])),
                    caption=caption,
                    text=text,
                    noise=[
                        _fixed_noise(entry["latents"].shape, index, j) for j in range(len(quantiles[index]))
                    ],
                    quantiles=quantiles[index],
                )
            )

    def _latents(
        self, adapter: ModelAdapter, item: ImageItem, bucket: tuple[int, int], cache: TensorCache | None
    ) -> dict[str, torch.Tensor]:
        """The image's latents and micro-conditioning, as the trainer encodes and caches them."""
        key = latent_key(file_digest(item.path), bucket, VALIDATION_CROP)
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            return cached
        rng = random.Random(key)
        loaded = load_image(item.path, bucket, VALIDATION_CROP, rng)
        generator = torch.Generator(adapter.device).manual_seed(rng.getrandbits(63))
        with torch.no_grad():
            latent = adapter.encode_images(loaded.pixels.unsqueeze(0), generator)[0]
        conditioning = torch.tensor([*loaded.original_size, *loaded.crop_top_left, *loaded.target_size])
        entry = {"latents": latent, "conditioning": conditioning}
        if cache is not None:
            cache.put(key, entry)
        return entry

    @staticmethod
    def _text(adapter: ModelAdapter, caption: str, cache: TensorCache | None) -> dict[str, torch.Tensor]:
        cached = cache.get(text_key(caption)) if cache is not None else None
        if cached is None:
            with torch.no_grad():
                cached = {k: v[0] for k, v in adapter.encode_captions([caption]).items()}
            if cache is not None:
                cache.put(text_key(caption), cached)
        return {k: v.cpu() for k, v in cached.items()}

    # ------------------------------------------------------------------ evaluating
    def due(self, step: int, total_steps: int) -> bool:
        """Every `validation.every_n_steps` steps, and at the last step."""
        return bool(self.entries) and (step == total_steps or (self.every > 0 and step % self.every == 0))

    def evaluate(self, adapter: ModelAdapter, optimizer: Any, step: int) -> dict[str, Any]:
        """The validation loss at x; returns the `validation` event's fields. The parameters, the
        modules' train/eval modes and every RNG are as before afterwards."""
        started = time.perf_counter()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved = [p.detach().clone() for p in params]
        modes = {m: m.training for module in adapter.lora_modules().values() for m in module.modules()}
        for module in modes:
            module.eval()  # no LoRA dropout: it would draw from the global RNG
        optimizer.eval()
        try:
            with torch.no_grad():
                loss = self._mean_loss(adapter)
        finally:
            optimizer.train()
            with torch.no_grad():  # train() after eval() is exact only to an ulp: restore y as it was
                for p, value in zip(params, saved):
                    p.copy_(value)
            for module, training in modes.items():
                module.train(training)
        if loss < self.best_loss:
            self.best_step, self.best_loss = step, loss
        return {
            "step": step,
            "loss": loss,
            "best_step": self.best_step,
            "best_loss": self.best_loss,
            "images": len(self.entries),
            "timesteps": self.config.validation.timesteps,
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _mean_loss(self, adapter: ModelAdapter) -> float:
        """Mean per-sample loss over every (image, timestep), in batches of training.batch_size."""
        batch_size = self.config.training.batch_size
        total, count = 0.0, 0
        for entry in self.entries:
            for start in range(0, len(entry.quantiles), batch_size):
                slots = range(start, min(start + batch_size, len(entry.quantiles)))
                losses = adapter.validation_loss(
                    entry.latents.unsqueeze(0).expand(len(slots), *entry.latents.shape).contiguous(),
                    self._batch_text(adapter, entry, len(slots)),
                    [entry.conditioning] * len(slots),
                    torch.stack([entry.noise[j] for j in slots]),
                    torch.tensor([entry.quantiles[j] for j in slots]),
                )
                total += losses.double().sum().item()
                count += len(slots)
        return total / count

    @staticmethod
    def _batch_text(adapter: ModelAdapter, entry: _Entry, size: int) -> dict[str, torch.Tensor]:
        text = entry.text
        if text is None:  # text encoders train: encode with their current (eval-mode) weights
            text = {k: v[0] for k, v in adapter.encode_captions([entry.caption]).items()}
        return {k: v.unsqueeze(0).expand(size, *v.shape).contiguous() for k, v in text.items()}

    # ------------------------------------------------------------------ resuming
    def restore(self, events: list[dict[str, Any]]) -> None:
        """Take the best step from the `validation` events a resumed run kept."""
        for event in events:
            if event.get("type") == "validation" and event["loss"] < self.best_loss:
                self.best_step, self.best_loss = event["step"], event["loss"]


def _fixed_noise(shape: torch.Size, image: int, slot: int) -> torch.Tensor:
    """Noise for validation sample (image, slot): drawn on the CPU from its own seed, so it is the same on
    every device, batch size and evaluation."""
    generator = torch.Generator().manual_seed(NOISE_SEED + 1000 * image + slot)
    return torch.randn(tuple(shape), generator=generator)


def build_validator(config: TrainConfig, held_out: list[ImageItem]) -> Validator | None:
    """A Validator for the config's validation images, or None when `dataset.validation` is not set."""
    if config.dataset.validation is None:
        return None
    items = validation_items(config.dataset, held_out)
    if not items:
        raise DatasetError(
            f"dataset.validation: no usable image in {config.dataset.validation}; add images with captions "
            "there, or give a fraction of the dataset to hold out (e.g. 0.1)"
        )
    return Validator(config, items)
