"""A full disk while the caches fill is an OSError with its errno (the trainer turns that into its "the disk
is full ... resume" message), not safetensors' own SafetensorError, and leaves no partial entry."""

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
