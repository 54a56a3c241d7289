"""Odd dataset inputs that used to be read silently wrong: 16-bit PNGs, non-UTF-8 captions, 0_ and abc_
folders, extreme aspect ratios, and over-long captions. Each is now read correctly or named in a warning."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainers.dataset import (
    DatasetError,
    assign_buckets,
    crop_warnings,
    load_image,
    scan_dataset,
)


def _png(path: Path, size: tuple[int, int] = (32, 24)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


# ---------------------------------------------------------------- 16-bit PNGs
@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_greyscale_png_loads_like_its_8_bit_version(tmp_path: Path, mode: str) -> None:
    width, height = 256, 8
    # a full-range 16-bit gradient, with low bits that 8 bits cannot hold
    wide = (np.arange(width * height, dtype=np.int64) * 65535 // (width * height - 1)).reshape(height, width)
    image = (
        Image.fromarray(wide.astype(np.uint16)) if mode == "I;16" else Image.fromarray(wide.astype(np.int32))
    )
    assert image.mode == mode
    path = tmp_path / "wide.png"
    image.save(path)
    assert Image.open(path).mode in ("I;16", "I")

    loaded = load_image(path, (width, height), "center", random.Random(0))

    # the 8-bit reference, written out: v8 = round(v16 * 255 / 65535), the same in R, G and B
    reference = np.rint(wide * 255.0 / 65535.0) / 127.5 - 1.0
    pixels = loaded.pixels.numpy()
    assert pixels.shape == (3, height, width)
    for channel in pixels:
        assert np.abs(channel - reference).max() <= 2 / 255 + 1e-6  # 1/255 of the [-1, 1] range
    assert pixels.min() == pytest.approx(-1.0) and pixels.max() == pytest.approx(1.0)


# ---------------------------------------------------------------- caption encodings
def test_caption_not_in_utf8_is_decoded_with_a_fallback_and_named(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café, naïve “quote”".encode("cp1252"))
    _png(tmp_path / "b.png")
    (tmp_path / "b.txt").write_bytes(b"\x81\x8d caf\xe9")  # undefined in cp1252: latin-1 takes it
    _png(tmp_path / "c.png")
    (tmp_path / "c.txt").write_bytes("\ufeffplain utf-8 é".encode())

    scan = scan_dataset(tmp_path)

    captions = {item.path.name: item.caption for item in scan.items}
    assert captions["a.png"] == "café, naïve “quote”"
    assert captions["b.png"] == "\x81\x8d café"
    assert captions["c.png"] == "plain utf-8 é"
    assert len(scan.warnings) == 2
    a_warning, b_warning = sorted(scan.warnings)
    assert str(tmp_path / "a.txt") in a_warning and "cp1252" in a_warning and "not UTF-8" in a_warning
    assert str(tmp_path / "b.txt") in b_warning and "latin-1" in b_warning


def test_metadata_jsonl_not_in_utf8_names_the_file(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_bytes('{"file_name": "a.png", "text": "café"}\n'.encode("cp1252"))

    with pytest.raises(DatasetError, match=r"metadata\.jsonl: not UTF-8 text .*save it as UTF-8"):
        scan_dataset(tmp_path)


# ---------------------------------------------------------------- kohya folder names
def test_zero_repeat_folder_is_left_out_as_kohya_does_with_a_warning(tmp_path: Path) -> None:
    _png(tmp_path / "2_dog" / "d.png")
    _png(tmp_path / "0_cat" / "c1.png")
    _png(tmp_path / "0_cat" / "c2.png")

    scan = scan_dataset(tmp_path)

    assert [item.path.name for item in scan.items] == ["d.png"]
    assert scan.num_samples == 2
    assert scan.skipped == []
    assert scan.warnings == [
        f"folder {tmp_path / '0_cat'}: a repeat count of 0 leaves its 2 image(s) out of training, as kohya "
        "does; rename it 1_cat to train on them"
    ]


def test_only_zero_repeat_folders_says_why_nothing_is_left(tmp_path: Path) -> None:
    _png(tmp_path / "0_cat" / "c.png")
    with pytest.raises(DatasetError, match=r"No usable images.*0_cat: a repeat count of 0"):
        scan_dataset(tmp_path)


def test_non_numeric_prefix_gets_one_repeat_and_a_warning_naming_the_folder(tmp_path: Path) -> None:
    _png(tmp_path / "abc_concept" / "a1.png")
    _png(tmp_path / "abc_concept" / "a2.png")
    _png(tmp_path / "plain" / "p.png")  # no underscore: nothing to warn about
    _png(tmp_path / "3_dog" / "my_photos" / "d.png")  # the 3_ above decides

    scan = scan_dataset(tmp_path)

    repeats = {item.path.name: item.repeats for item in scan.items}
    assert repeats == {"a1.png": 1, "a2.png": 1, "p.png": 1, "d.png": 3}
    assert len(scan.warnings) == 1
    warning = scan.warnings[0]
    assert warning.startswith(f"folder {tmp_path / 'abc_concept'}: 'abc' is not a repeat count")
    assert "once per epoch" in warning and "N_concept" in warning


# ---------------------------------------------------------------- extreme aspect ratios
def test_extreme_aspect_ratio_warns_with_the_file_max_aspect_and_kept_fraction(tmp_path: Path) -> None:
    _png(tmp_path / "strip.png", (20000, 100))
    _png(tmp_path / "normal.png", (1024, 768))
    _png(tmp_path / "wide.png", (300, 100))  # 3:1 in a 2:1 bucket keeps 2/3: no warning

    scan = scan_dataset(tmp_path)
    buckets = assign_buckets(scan.items, 1024, 2.0, True)
    warnings = crop_warnings(scan.items, buckets, 2.0)

    assert len(warnings) == 1
    bucket = buckets[[item.path.name for item in scan.items].index("strip.png")]
    # written out: the image is scaled to cover the bucket, so the crop keeps the ratio of the aspects
    kept = (bucket[0] / bucket[1]) / (20000 / 100)
    assert bucket == (1408, 704)
    assert warnings[0] == (
        f"image {tmp_path / 'strip.png'}: 20000x100 has aspect 200.0:1, beyond dataset.max_aspect = 2; "
        f"its 1408x704 bucket keeps {kept:.1%} of the image. Crop it yourself, or raise dataset.max_aspect"
    )
    assert f"{kept:.1%}" == "1.0%"


# ---------------------------------------------------------------- through the trainer
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from trainers.tiny_models import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("model") / "tiny-sdxl")


def test_over_long_caption_is_reported_once_in_one_short_line(
    tiny_model: Path, tmp_path: Path, capfd
) -> None:
    import torch

    from trainers.config import validate_config
    from trainers.models.sdxl import SDXLAdapter

    config = validate_config(
        {
            "name": "run",
            "model": {"path": str(tiny_model)},
            "dataset": {"path": str(tmp_path), "resolution": 64},
            "training": {"max_steps": 1, "precision": "fp32"},
        }
    )
    adapter = SDXLAdapter(config, torch.device("cpu"))
    adapter.load()
    long_caption = " ".join(["dog"] * 10_000)  # "dog" is one token of the tiny tokenizer
    capfd.readouterr()
    # the libraries log through their own handlers (not propagated to pytest's): listen on them directly
    records: list[logging.LogRecord] = []
    listener = logging.Handler()
    listener.emit = records.append
    library_loggers = [logging.getLogger("diffusers"), logging.getLogger("transformers")]
    for logger in library_loggers:
        logger.addHandler(listener)
    try:
        adapter.encode_captions([long_caption, "a dog", long_caption])
        adapter.encode_captions([long_caption])
    finally:
        for logger in library_loggers:
            logger.removeHandler(listener)

    assert [r.getMessage()[:200] for r in records if r.levelno >= logging.WARNING] == []
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[:2000]
    # 10,000 words + the start and end tokens, against CLIP's 77
    assert "is 10002 tokens long; the text encoder reads only the first 77" in lines[0]
    assert len(err) < 400


def test_trainer_logs_scan_warnings_and_writes_caches_to_cache_dir(tiny_model: Path, tmp_path: Path) -> None:
    from trainers import train as training
    from trainers.cache import CACHE_FOLDER
    from trainers.config import validate_config
    from trainers.events import read_events
    from trainers.tiny_models import write_demo_dataset

    data = write_demo_dataset(tmp_path / "data", num_images=3)
    _png(data / "0_unused" / "u.png", (64, 64))
    _png(data / "abc_more" / "m.png", (64, 64))
    config = validate_config(
        {
            "name": "run",
            "output_dir": str(tmp_path / "runs"),
            "model": {"path": str(tiny_model)},
            "dataset": {"path": str(data), "resolution": 64, "cache_dir": str(tmp_path / "cache")},
            "lora": {"rank": 4},
            "training": {"max_steps": 2, "precision": "fp32"},
            "saving": {"every_n_steps": 0, "formats": ["kohya"]},
        }
    )

    run_dir = training.train(config)

    warnings = [e["message"] for e in read_events(run_dir) if e["type"] == "warning"]
    assert any(m.startswith(f"folder {data / '0_unused'}: a repeat count of 0") for m in warnings), warnings
    assert any(m.startswith(f"folder {data / 'abc_more'}: 'abc' is not a repeat count") for m in warnings)
    assert list((tmp_path / "cache").rglob("*.safetensors")), "no cache entries in dataset.cache_dir"
    assert not (data / CACHE_FOLDER).exists()
