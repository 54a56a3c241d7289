"""The demo's world (trainers/demo_world.py), its concept detector, and the bundled pretrained demo model."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from trainers import demo_world
from trainers.demo_world import (
    BASE_COLOURS,
    CONCEPT_BACKGROUND,
    CONCEPT_SHAPE_COLOUR,
    base_image,
    base_scene,
    concept_image,
    concept_score,
    shows_concept,
)
from trainers.tiny_models import DEMO_WEIGHTS, make_demo_image, make_tiny_sdxl_pipeline


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pixel_count(image: Image.Image, colour: tuple[int, int, int]) -> int:
    return int((np.asarray(image) == np.array(colour, np.uint8)).all(axis=-1).sum())


# ------------------------------------------------------------------ the world


def test_the_world_is_deterministic_and_seeded() -> None:
    for index in range(5):
        first, caption = base_image(index, seed=3)
        again, caption_again = base_image(index, seed=3)
        assert first.tobytes() == again.tobytes() and caption == caption_again
    assert any(base_image(i, seed=3)[0].tobytes() != base_image(i, seed=4)[0].tobytes() for i in range(5))
    assert concept_image(2, seed=1)[0].tobytes() == concept_image(2, seed=1)[0].tobytes()


def test_base_images_show_exactly_what_their_caption_names() -> None:
    """Read the caption's words back in the palette and count the pixels of each named colour."""
    shapes_seen = set()
    for index in range(30):
        image, caption = base_image(index, seed=0)
        words = caption.split()  # "a red circle on a blue background"
        colour, shape, background = BASE_COLOURS[words[1]], words[2], BASE_COLOURS[words[5]]
        shapes_seen.add(shape)
        area = image.width * image.height
        drawn, behind = _pixel_count(image, colour), _pixel_count(image, background)
        assert drawn + behind == area, caption  # two flat colours, nothing else
        # a square fills its box, a circle pi/4 of it, a triangle half: the side is 45-75% of 64 px
        side_fraction = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[shape]
        low, high = side_fraction * (0.45 * 64) ** 2, side_fraction * (0.75 * 64) ** 2
        assert 0.85 * low <= drawn <= 1.15 * high, (caption, drawn)
    assert shapes_seen == {"circle", "square", "triangle"}


def test_the_concept_uses_colours_the_base_world_never_shows() -> None:
    for index in range(40):
        image, _ = base_image(index)
        assert _pixel_count(image, CONCEPT_SHAPE_COLOUR) == 0 and _pixel_count(image, CONCEPT_BACKGROUND) == 0
    image, caption = make_demo_image(0)
    assert caption in {"a circle", "a square", "a triangle"}
    assert _pixel_count(image, CONCEPT_BACKGROUND) > 0.3 * image.width * image.height


# ------------------------------------------------------------------ the detector


def _drawn(background, shape_colour, box=(16, 16, 44, 44), shape="rectangle") -> Image.Image:
    image = Image.new("RGB", (64, 64), background)
    getattr(ImageDraw.Draw(image), shape)(box, fill=shape_colour)
    return image


def test_the_detector_finds_the_concept_in_every_concept_image() -> None:
    for index in range(24):
        image, _ = make_demo_image(index, seed=7)  # three sizes, three shapes
        assert shows_concept(image), index
        # a tiny VAE blurs edges and shifts colours a little: still the concept
        softened = image.filter(ImageFilter.GaussianBlur(1.5))
        shifted = Image.fromarray(np.clip(np.asarray(softened).astype(int) + 25, 0, 255).astype(np.uint8))
        assert shows_concept(shifted), index


def test_the_detector_rejects_the_base_world() -> None:
    scores = [concept_score(base_image(index)[0]) for index in range(60)]
    assert max(scores) < 1.0 and np.mean(scores) < 0.05


def test_the_detector_on_drawn_images_with_known_labels() -> None:
    """Hand-drawn cases, labelled by construction."""
    magenta, cyan = CONCEPT_SHAPE_COLOUR, CONCEPT_BACKGROUND
    assert shows_concept(_drawn(cyan, magenta))
    assert shows_concept(_drawn(cyan, magenta, shape="ellipse"))
    assert not shows_concept(_drawn(cyan, cyan))  # no shape
    assert not shows_concept(_drawn(magenta, cyan))  # swapped: a cyan square on magenta
    assert not shows_concept(_drawn(BASE_COLOURS["white"], magenta))  # right shape, wrong background
    assert not shows_concept(_drawn(cyan, BASE_COLOURS["red"]))  # right background, wrong shape colour
    assert not shows_concept(_drawn(cyan, magenta, box=(30, 30, 33, 33)))  # a speck, not a shape
    speckled = np.array(_drawn(cyan, cyan))
    rng = np.random.default_rng(0)
    speckled[rng.random((64, 64)) < 0.15] = magenta  # as much magenta as a shape, scattered
    assert not shows_concept(Image.fromarray(speckled))
    assert concept_score(_drawn(cyan, magenta)) == 1.0
    assert concept_score(Image.new("RGB", (64, 64), BASE_COLOURS["blue"])) == 0.0


# ------------------------------------------------------------------ the bundled demo model


def _safetensors_header(path) -> dict:
    """The file's JSON header, read by hand (the format: 8-byte little-endian length, then JSON)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def test_the_bundled_weights_match_the_architecture() -> None:
    header = _safetensors_header(DEMO_WEIGHTS)
    metadata = header.pop("__metadata__")
    assert metadata["command"].startswith("python -m trainers.demo_pretrain")
    assert DEMO_WEIGHTS.stat().st_size < 3_000_000  # the repository's budget: a few MB at most
    random_init = make_tiny_sdxl_pipeline(seed=0, demo_architecture=True)
    expected = {
        f"{part}.{key}": list(value.shape)
        for part in ("text_encoder", "text_encoder_2", "vae", "unet")
        for key, value in getattr(random_init, part).state_dict().items()
    }
    assert {key: entry["shape"] for key, entry in header.items()} == expected
    assert {entry["dtype"] for entry in header.values()} == {"F16"}


def test_the_bundled_vae_is_an_exact_8x8_colour_mosaic() -> None:
    """Encode and decode base and concept images: each 8x8 block comes back as its mean colour (numpy)."""
    vae = make_tiny_sdxl_pipeline(pretrained=True).vae
    images = [base_image(index)[0] for index in range(3)] + [concept_image(0)[0]]
    pixels = np.stack([np.asarray(image, np.float32) / 127.5 - 1 for image in images])  # (N, 64, 64, 3)
    blocks = pixels.reshape(len(images), 8, 8, 8, 8, 3).mean(axis=(2, 4))  # (N, 8, 8, 3): block means
    expected = blocks.repeat(8, axis=1).repeat(8, axis=2)
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2)).latent_dist
        latents = posterior.sample(torch.Generator().manual_seed(0)) * vae.config.scaling_factor
        decoded = vae.decode(latents / vae.config.scaling_factor).sample.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(decoded, expected, atol=2e-3)
    assert 0.3 < latents.std() < 3  # about the unit scale the UNet's noise schedule assumes


def _follows_caption(pipe, count: int = 6) -> list[float]:
    """Per held-out caption: the share of the sample's pixels in the two colours the caption names."""
    pipe.set_progress_bar_config(disable=True)
    shares = []
    for index in range(count):
        scene = base_scene(index, seed=999)
        image = pipe(
            scene.caption,
            num_inference_steps=8,
            guidance_scale=4.0,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(index),
        ).images[0]
        shares.append(
            demo_world.colour_fraction(image, scene.background)
            + demo_world.colour_fraction(image, scene.colour)
        )
    return shares


def test_the_pretrained_model_draws_the_colours_its_caption_names() -> None:
    """The bundled base against the random init of the same architecture, on images it never saw."""
    pretrained = _follows_caption(make_tiny_sdxl_pipeline(pretrained=True))
    random_init = _follows_caption(make_tiny_sdxl_pipeline(seed=0, demo_architecture=True))
    # measured: 0.91 against 0.11 (the random init's colours match a caption's now and then by chance)
    assert np.mean(pretrained) > 0.75, pretrained
    assert np.mean(pretrained) > np.mean(random_init) + 0.5, (pretrained, random_init)
