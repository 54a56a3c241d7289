"""Disk caches of latents and text embeddings, one safetensors file per entry.

Entries are keyed by what they depend on (file content hash, bucket, crop, caption text, model), so a
second run skips the VAE and text encoders, and a changed image or caption invalidates only its own entry.
The cache lives in dataset.cache_dir, or else in a hidden folder inside the dataset, which the scan ignores.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file

from trainers.atomic import atomic_write, write_safetensors
from trainers.paths import CACHE_FOLDER


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (first 20 hex digits)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


MEMORY_BYTES = 512 << 20  # entries also kept in RAM, least recently used dropped first


class TensorCache:
    """Named groups of tensors on disk, the most recently used also in memory (a training step reads its
    batch's entries every epoch: from RAM, not from a file); `hits` and `misses` count lookups. The
    tensors returned are shared with the memory copy: read them, do not modify them in place."""

    def __init__(self, folder: Path, memory_bytes: int = MEMORY_BYTES) -> None:
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._held = 0

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            self.hits += 1
            return dict(self._memory[key])
        path = self._path(key)
        if path.is_file():
            try:
                tensors = load_file(path)
            except Exception:  # a damaged entry is recomputed, never trusted
                path.unlink(missing_ok=True)
            else:
                self.hits += 1
                self._remember(key, tensors)
                return dict(tensors)
        self.misses += 1
        return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        # written by Python, so a full disk is an OSError with its errno, as for checkpoints
        atomic_write(self._path(key), lambda tmp: write_safetensors(tmp, tensors))
        self._remember(key, tensors)

    def _remember(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > self.memory_bytes:
            return
        if key in self._memory:
            self._held -= sum(t.numel() * t.element_size() for t in self._memory.pop(key).values())
        self._memory[key] = tensors
        self._held += size
        while self._held > self.memory_bytes:
            _, dropped = self._memory.popitem(last=False)
            self._held -= sum(t.numel() * t.element_size() for t in dropped.values())


def cache_root(dataset_root: Path, cache_dir: str | None) -> Path:
    """The folder holding a dataset's caches: `cache_dir` if given, else <dataset>/.ppsf-cache."""
    return Path(cache_dir).expanduser() if cache_dir else Path(dataset_root) / CACHE_FOLDER


def latent_cache(root: Path, fingerprint: str) -> TensorCache:
    """Latents under a cache root (see cache_root); `fingerprint` separates models and their settings."""
    return TensorCache(Path(root) / fingerprint / "latents")


def text_cache(root: Path, fingerprint: str) -> TensorCache:
    return TensorCache(Path(root) / fingerprint / "text")


def latent_key(image_digest: str, bucket: tuple[int, int], crop: str) -> str:
    return hashlib.sha256(f"{image_digest}|{bucket[0]}x{bucket[1]}|{crop}".encode()).hexdigest()[:32]


def text_key(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]
