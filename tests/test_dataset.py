"""Dataset scanning, captions, buckets and image loading (trainers/dataset.py), on generated files only."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainers.dataset import (
    DatasetError,
    ImageItem,
    assign_bucket,
    assign_buckets,
    bucket_summary,
    load_image,
    make_buckets,
    process_caption,
    scan_dataset,
)
from trainers.tiny_models import write_demo_dataset

BUCKETS_1024 = [
    (704, 1408),
    (768, 1344),
    (832, 1216),
    (896, 1152),
    (960, 1088),
    (1024, 1024),
    (1088, 960),
    (1152, 896),
    (1216, 832),
    (1344, 768),
    (1408, 704),
]


def _png(path: Path, size: tuple[int, int] = (32, 24), colour: tuple[int, int, int] = (200, 10, 10)) -> Path:
    """Write a solid-colour PNG of ``size`` (width, height) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _gradient(size: tuple[int, int]) -> Image.Image:
    """Return an RGB image whose pixels differ across the image, so crops at different offsets differ."""
    width, height = size
    x = torch.arange(width).view(1, width).expand(height, width)
    y = torch.arange(height).view(height, 1).expand(height, width)
    rgb = torch.stack([(x * 7) % 256, (y * 5) % 256, (x + y) % 256], dim=-1).to(torch.uint8)
    return Image.fromarray(rgb.numpy(), "RGB")


# --------------------------------------------------------------------------------------------------
# scan_dataset
# --------------------------------------------------------------------------------------------------


def test_demo_dataset_scans_with_repeats_two(tmp_path: Path) -> None:
    root = write_demo_dataset(tmp_path / "demo", num_images=12, seed=0)

    scan = scan_dataset(root)

    assert root == tmp_path / "demo"
    assert len(scan.items) == 12
    assert scan.num_samples == 24
    assert {item.repeats for item in scan.items} == {2}
    assert {item.path.parent.name for item in scan.items} == {"2_shapes"}
    assert scan.skipped == [] and scan.missing_captions == []
    sizes = sorted((item.width, item.height) for item in scan.items)
    assert sizes == [(64, 64)] * 4 + [(64, 96)] * 4 + [(96, 64)] * 4
    # the demo's concept: the caption names the shape, the preset's trigger word the colours
    assert {item.caption for item in scan.items} <= {"a circle", "a square", "a triangle"}


def test_demo_dataset_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    first = write_demo_dataset(tmp_path / "a", num_images=3, seed=5) / "2_shapes"
    second = write_demo_dataset(tmp_path / "b", num_images=3, seed=5) / "2_shapes"
    other_seed = write_demo_dataset(tmp_path / "c", num_images=3, seed=6) / "2_shapes"
    names = sorted(p.name for p in first.iterdir())
    assert names == [f"shape_00{i}.{ext}" for i in range(3) for ext in ("png", "txt")]
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)
    assert any((first / n).read_bytes() != (other_seed / n).read_bytes() for n in names)

    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    (first / "shape_001.png").unlink()
    write_demo_dataset(tmp_path / "a", num_images=3, seed=5)
    assert (first / "shape_001.png").read_bytes() == (second / "shape_001.png").read_bytes()
    assert (first / "shape_000.png").stat().st_mtime_ns == mtimes["shape_000.png"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["2_shapes"]  # no temp folders left

    (first / "shape_002.txt").write_text("a red circle on a blue background\n")  # an older release's demo
    write_demo_dataset(tmp_path / "a", num_images=3, seed=5)
    assert (first / "shape_002.txt").read_bytes() == (second / "shape_002.txt").read_bytes()


def test_captions_from_side_files_and_metadata_jsonl(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a photo,\n of  sks \n", encoding="utf-8")
    _png(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("side caption loses", encoding="utf-8")
    _png(tmp_path / "c.png")
    _png(tmp_path / "d.png")  # no caption anywhere
    _png(tmp_path / "e.png")
    (tmp_path / "e.caption").write_text("only with .caption", encoding="utf-8")
    _png(tmp_path / "sub" / "f.png")
    (tmp_path / "sub" / "f.txt").write_text("side f", encoding="utf-8")
    lines = [
        {"file_name": "b.png", "text": "metadata wins"},
        {"file_name": "c.png", "text": "from metadata"},
        {"file_name": "sub/f.png", "text": "outer metadata"},
    ]
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8"
    )
    (tmp_path / "sub" / "metadata.jsonl").write_text('{"file_name": "f.png", "text": "inner wins"}\n')

    scan = scan_dataset(tmp_path)

    captions = {item.path.relative_to(tmp_path).as_posix(): item.caption for item in scan.items}
    assert captions == {
        "a.png": "a photo, of sks",
        "b.png": "metadata wins",
        "c.png": "from metadata",
        "d.png": "",
        "e.png": "",
        "sub/f.png": "inner wins",
    }
    assert scan.missing_captions == [tmp_path / "d.png", tmp_path / "e.png"]
    assert {i.path.name: i.caption for i in scan_dataset(tmp_path, caption_extension="caption").items}[
        "e.png"
    ] == "only with .caption"


def test_malformed_metadata_raises_with_file_and_line(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{not json\n')

    with pytest.raises(DatasetError, match=r"metadata\.jsonl:2: invalid JSON"):
        scan_dataset(tmp_path)


def test_kohya_repeat_folders(tmp_path: Path) -> None:
    _png(tmp_path / "3_dog" / "x.png")
    _png(tmp_path / "3_dog" / "nested" / "y.png")
    _png(tmp_path / "3_dog" / "5_close" / "z.png")
    _png(tmp_path / "10_cat style" / "c.png")
    _png(tmp_path / "plain" / "p.png")
    _png(tmp_path / "0_none" / "n.png")
    _png(tmp_path / "top.png")

    scan = scan_dataset(tmp_path)

    repeats = {item.path.name: item.repeats for item in scan.items}
    # 0_none is left out, as kohya does (tests/test_dataset_inputs.py checks its warning)
    assert repeats == {"x.png": 3, "y.png": 3, "z.png": 5, "c.png": 10, "p.png": 1, "top.png": 1}
    assert scan.num_samples == 3 + 3 + 5 + 10 + 1 + 1


def test_extensions_case_insensitive_and_hidden_ignored(tmp_path: Path) -> None:
    _png(tmp_path / "a.PNG")
    Image.new("RGB", (20, 10)).save(tmp_path / "b.JpEg", format="JPEG")
    Image.new("RGB", (10, 20)).save(tmp_path / "c.webp", format="WEBP")
    Image.new("RGB", (8, 8)).save(tmp_path / "d.gif", format="GIF")  # not a training format
    _png(tmp_path / ".hidden" / "e.png")
    _png(tmp_path / "._f.png")

    scan = scan_dataset(tmp_path)

    assert [(i.path.name, i.width, i.height) for i in scan.items] == [
        ("a.PNG", 32, 24),
        ("b.JpEg", 20, 10),
        ("c.webp", 10, 20),
    ]
    assert scan.skipped == []


def test_symlinked_folders_are_followed_once(tmp_path: Path) -> None:
    _png(tmp_path / "elsewhere" / "me.png")
    root = tmp_path / "root"
    root.mkdir()
    (root / "10_me").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "10_me" / "loop").symlink_to(root, target_is_directory=True)  # would recurse forever
    (root / "gone.png").symlink_to(tmp_path / "missing.png")

    scan = scan_dataset(root)

    assert [(item.path, item.repeats) for item in scan.items] == [(root / "10_me" / "me.png", 10)]
    assert scan.skipped == [(root / "gone.png", "cannot read file (No such file or directory)")]


def test_broken_files_are_skipped_with_reasons(tmp_path: Path) -> None:
    _png(tmp_path / "good.png")
    Image.new("RGB", (48, 40), (1, 2, 3)).save(tmp_path / "good.jpg", quality=90)
    (tmp_path / "empty.png").write_bytes(b"")
    jpeg = _gradient((256, 256))
    jpeg.save(tmp_path / "whole.jpg", quality=95)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "whole.jpg").unlink()
    (tmp_path / "notes.png").write_text("this is text, not a PNG")

    scan = scan_dataset(tmp_path)

    assert sorted(item.path.name for item in scan.items) == ["good.jpg", "good.png"]
    reasons = {path.name: reason for path, reason in scan.skipped}
    assert set(reasons) == {"empty.png", "truncated.jpg", "notes.png"}
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert "truncated" in reasons["truncated.jpg"]
    assert reasons["notes.png"] == "not an image file Pillow can read"


def test_exif_rotated_size_is_reported_as_displayed(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    Image.new("RGB", (80, 40)).save(tmp_path / "rot.jpg", exif=exif)

    (item,) = scan_dataset(tmp_path).items
    loaded = load_image(item.path, (40, 80), "center", random.Random(0))

    assert (item.width, item.height) == (40, 80)
    assert loaded.original_size == (80, 40)
    assert loaded.crop_top_left == (0, 0)


def test_missing_empty_and_unusable_folders_raise(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match=re.escape(f"Dataset folder {missing} does not exist")):
        scan_dataset(missing)

    a_file = _png(tmp_path / "file.png")
    with pytest.raises(DatasetError, match=re.escape(f"Dataset path {a_file} is not a folder")):
        scan_dataset(a_file)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=re.escape(f"No usable images in dataset folder {empty} ")):
        scan_dataset(empty)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"1 file\(s\) could not be read, e\.g\. x\.png: empty file"):
        scan_dataset(broken)


# --------------------------------------------------------------------------------------------------
# process_caption
# --------------------------------------------------------------------------------------------------


def _caption(caption: str, seed: int = 0, **overrides) -> str:
    """Call process_caption with neutral defaults and an rng seeded with ``seed``."""
    options = dict(trigger_word=None, shuffle_tags=False, keep_tokens=0, caption_dropout=0.0)
    options.update(overrides)
    return process_caption(caption, rng=random.Random(seed), **options)


def test_caption_keeps_first_tags_and_trigger_in_place_while_shuffling_the_rest() -> None:
    caption = "a photo, of a dog, grass, sky, tree, sun, cloud"
    tail = ["grass", "sky", "tree", "sun", "cloud"]
    orders = set()
    for seed in range(200):
        tags = _caption(caption, seed, trigger_word="sks", shuffle_tags=True, keep_tokens=2).split(", ")
        assert tags[:3] == ["sks", "a photo", "of a dog"]
        assert sorted(tags[3:]) == sorted(tail)
        orders.add(tuple(tags[3:]))
    # 5 tags have 120 orders; 200 draws that really shuffle reach most of them.
    assert len(orders) > 60


def test_caption_trigger_already_present_stays_where_it_is() -> None:
    caption = "portrait, SKS man, smiling, outdoors, red hat"
    for seed in range(50):
        tags = _caption(caption, seed, trigger_word="sks", shuffle_tags=True, keep_tokens=1).split(", ")
        assert tags[0] == "portrait" and tags[1] == "SKS man"
        assert sorted(tags[2:]) == ["outdoors", "red hat", "smiling"]
    # "sksx" contains the letters but not the word, so the trigger is still prepended.
    assert _caption("sksx style", trigger_word="sks") == "sks, sksx style"


def test_caption_normalisation_without_shuffle() -> None:
    assert _caption(" a dog ,  grass ,, sky, ", trigger_word="ohwx") == "ohwx, a dog, grass, sky"
    assert _caption("a dog, grass", trigger_word=None) == "a dog, grass"
    assert _caption("", trigger_word="sks") == "sks"
    assert _caption("", trigger_word=None) == ""
    assert _caption("a, b, c", shuffle_tags=True, keep_tokens=5) == "a, b, c"


def test_caption_dropout() -> None:
    assert _caption("a dog", trigger_word="sks", caption_dropout=1.0) == ""
    rng = random.Random(0)
    results = [
        process_caption(
            "a dog", trigger_word="sks", shuffle_tags=False, keep_tokens=0, caption_dropout=0.25, rng=rng
        )
        for _ in range(4000)
    ]
    assert set(results) == {"", "sks, a dog"}
    assert 0.22 < results.count("") / len(results) < 0.28
    with pytest.raises(ValueError, match="caption_dropout"):
        _caption("a dog", caption_dropout=1.5)


# --------------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------------


def test_make_buckets_1024_matches_sdxl_list() -> None:
    buckets = make_buckets(1024)

    assert buckets == BUCKETS_1024
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert 0.9 * 1024**2 <= width * height <= 1024**2
        assert max(width, height) / min(width, height) <= 2.0


def test_make_buckets_other_settings() -> None:
    assert make_buckets(512) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert make_buckets(1024, max_aspect=1.3) == [
        (896, 1152),
        (960, 1088),
        (1024, 1024),
        (1088, 960),
        (1152, 896),
    ]
    odd = make_buckets(1000)
    assert (960, 960) in odd and all(w * h <= 1000**2 and w % 64 == h % 64 == 0 for w, h in odd)
    with pytest.raises(ValueError):
        make_buckets(32)


def test_assign_bucket_by_aspect_ratio() -> None:
    assert assign_bucket(2000, 1000, BUCKETS_1024, no_upscale=False) == (1408, 704)
    assert assign_bucket(1000, 2000, BUCKETS_1024, no_upscale=False) == (704, 1408)
    assert assign_bucket(5000, 1000, BUCKETS_1024, no_upscale=False) == (1408, 704)
    assert assign_bucket(777, 777, BUCKETS_1024, no_upscale=False) == (1024, 1024)
    assert assign_bucket(100, 70, BUCKETS_1024, no_upscale=False) == (1216, 832)
    # Large images are unaffected by no_upscale.
    assert assign_bucket(3000, 2000, BUCKETS_1024, no_upscale=True) == (1216, 832)


def test_assign_bucket_no_upscale_uses_own_size_rounded_down() -> None:
    assert assign_bucket(100, 70, BUCKETS_1024, no_upscale=True) == (64, 64)
    assert assign_bucket(700, 500, BUCKETS_1024, no_upscale=True) == (640, 448)
    assert assign_bucket(30, 200, BUCKETS_1024, no_upscale=True) == (64, 192)  # at least one step
    assert assign_bucket(700, 500, BUCKETS_1024, no_upscale=True, step=32) == (672, 480)


def test_assign_buckets_honours_no_upscale() -> None:
    """The per-dataset helper the trainer uses, against the rule written out for these sizes.

    At resolution 512 the buckets are 384x640, 448x576, 512x512, 576x448, 640x384. A 300x200 image
    (aspect 1.5) is nearest to 640x384 in log aspect (|ln(1.667/1.5)| = 0.105 < |ln(1.286/1.5)| = 0.154);
    it has fewer pixels than that bucket, so no_upscale keeps its own size rounded down to multiples of
    64: 256x192. A 2000x1000 image is larger than its bucket (640x384) either way.
    """
    small = ImageItem(Path("small.png"), "", 1, 300, 200)
    large = ImageItem(Path("large.png"), "", 1, 2000, 1000)
    assert assign_buckets([small, large], 512, 2.0, no_upscale=True) == [(256, 192), (640, 384)]
    assert assign_buckets([small, large], 512, 2.0, no_upscale=False) == [(640, 384), (640, 384)]


def test_bucket_summary_table() -> None:
    table = bucket_summary([(1024, 1024), (1152, 896), (1024, 1024), (896, 1152)])
    assert table.splitlines() == [
        "     bucket  aspect  images",
        "   896x1152    0.78       1",
        "  1024x1024    1.00       2",
        "   1152x896    1.29       1",
        "      total               4",
    ]
    assert (
        bucket_summary({"a.png": (64, 64), "b.png": (64, 64)}).splitlines()[1]
        == "      64x64    1.00       2"
    )


# --------------------------------------------------------------------------------------------------
# load_image
# --------------------------------------------------------------------------------------------------


def test_load_image_center_crop(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    _gradient((100, 70)).save(path)

    loaded = load_image(path, (64, 64), "center", random.Random(0))

    assert loaded.pixels.shape == (3, 64, 64) and loaded.pixels.dtype == torch.float32
    assert loaded.pixels.min() >= -1.0 and loaded.pixels.max() <= 1.0
    assert loaded.original_size == (70, 100)
    # Resized to cover 64x64 keeping aspect: 100x70 -> 91x64, so the centred crop starts at x = 13.
    assert loaded.crop_top_left == (0, 13)
    assert loaded.target_size == (64, 64)


def test_load_image_random_crop_is_consistent_with_center(tmp_path: Path) -> None:
    path = tmp_path / "tall.png"
    _gradient((60, 150)).save(path)
    center = load_image(path, (64, 128), "center", random.Random(0))
    assert center.crop_top_left == (16, 0)  # 60x150 -> 64x160

    offsets = set()
    for seed in range(40):
        loaded = load_image(path, (64, 128), "random", random.Random(seed))
        top, left = loaded.crop_top_left
        assert left == 0 and 0 <= top <= 32
        assert loaded.pixels.shape == (3, 128, 64)
        offsets.add(top)
        if top == 16:
            assert torch.equal(loaded.pixels, center.pixels)
        # The crop window moved, so the pixels at the same output position came from a different row.
        elif abs(top - 16) > 2:
            assert not torch.equal(loaded.pixels, center.pixels)
    assert len(offsets) > 10


def test_load_image_exact_values_and_mode_conversion(tmp_path: Path) -> None:
    values = torch.tensor([[[0, 255, 128]] * 8] * 8, dtype=torch.uint8)  # 8x8, every pixel (0, 255, 128)
    Image.fromarray(values.numpy(), "RGB").save(tmp_path / "rgb.png")
    Image.new("L", (8, 8), 51).save(tmp_path / "grey.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")

    rgb = load_image(tmp_path / "rgb.png", (8, 8), "center", random.Random(0)).pixels
    grey = load_image(tmp_path / "grey.png", (8, 8), "random", random.Random(0)).pixels
    clear = load_image(tmp_path / "clear.png", (8, 8), "center", random.Random(0)).pixels

    # Same float32 arithmetic as the loader, so equality is exact.
    assert torch.equal(rgb[:, 0, 0], torch.tensor([0.0, 255.0, 128.0]) / 127.5 - 1.0)
    assert torch.equal(rgb, rgb[:, :1, :1].expand(3, 8, 8))
    assert grey.shape == (3, 8, 8) and torch.allclose(grey, torch.full((3, 8, 8), 51 / 127.5 - 1.0))
    assert torch.equal(clear, torch.ones(3, 8, 8))  # fully transparent becomes white
    with pytest.raises(ValueError, match="crop must be one of"):
        load_image(tmp_path / "rgb.png", (8, 8), "top", random.Random(0))
