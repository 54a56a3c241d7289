"""The latent and text caches: entries kept in memory up to a bound (reading a file each step costs the
tiny models 4% of a step), and a full disk while the caches fill is an OSError with its errno (the trainer
turns that into its "the disk is full ... resume" message), not safetensors' SafetensorError."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.cache import TensorCache


@pytest.fixture
def tiny_disk(tmp_path) -> Path:
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        pytest.skip("mounting a tiny tmpfs needs root on Linux")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_while_caching_is_an_oserror_with_its_errno(tiny_disk) -> None:
    cache = TensorCache(tiny_disk / "latents")
    cache.put("a" * 32, {"latents": torch.ones(4, 8, 8)})  # a small entry fits
    with pytest.raises(OSError) as raised:
        cache.put("b" * 32, {"latents": torch.ones(64 * 1024)})  # 256 KiB on a 64 KiB disk
    assert raised.value.errno == errno.ENOSPC
    assert [p.name for p in (tiny_disk / "latents").rglob("*") if p.is_file()] == ["a" * 32 + ".safetensors"]
    assert torch.equal(cache.get("a" * 32)["latents"], torch.ones(4, 8, 8))
    assert cache.get("b" * 32) is None


def entry(value: float, numel: int = 256) -> dict[str, torch.Tensor]:
    return {"latents": torch.full((numel,), float(value))}  # 1 KiB of float32


def test_entries_are_read_from_memory_up_to_the_bound(tmp_path, monkeypatch) -> None:
    import trainers.cache

    reads = []
    real_load = trainers.cache.load_file
    monkeypatch.setattr(trainers.cache, "load_file", lambda path: reads.append(path) or real_load(path))
    cache = TensorCache(tmp_path / "c", memory_bytes=2 * 1024)  # two entries
    for index in range(3):
        cache.put(f"{index:032d}", entry(index))
    # the two most recent are in memory; the first was dropped and is read from its file, once
    for index in (2, 1, 0, 0):
        assert torch.equal(cache.get(f"{index:032d}")["latents"], torch.full((256,), float(index)))
    assert [path.name for path in reads] == [f"{0:032d}.safetensors"]
    assert cache.hits == 4 and cache.get("f" * 32) is None and cache.misses == 1
    # reading entry 0 made it the most recent: entry 2 (least recently used) left memory
    assert torch.equal(cache.get(f"{2:032d}")["latents"], torch.full((256,), 2.0))
    assert [path.name for path in reads][-1] == f"{2:032d}.safetensors"
    # a fresh cache object (a new run) reads what is on disk
    assert torch.equal(TensorCache(tmp_path / "c").get(f"{1:032d}")["latents"], torch.full((256,), 1.0))
