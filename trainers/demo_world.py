"""The demo's procedural world: coloured shapes on plain backgrounds, captioned, and a concept it lacks.

The tiny demo models are pretrained on the *base world* ("a red circle on a white background": three shapes,
seven colours), so their samples follow the caption. The demo dataset then teaches a *concept* the base
world never shows: behind the trigger word, every shape is magenta on a cyan background (neither colour
exists in the base world). `concept_score` measures that concept in any image from colour and shape
statistics alone, so "before training few samples show it, after training most do" is a number.

Everything here is deterministic: an image depends only on its (seed, index) and is drawn with Pillow.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# The base world's palette: far apart in RGB, and none of them near the concept's two colours below.
BASE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}

CONCEPT_TRIGGER = "sks"
CONCEPT_SHAPE_COLOUR: tuple[int, int, int] = (230, 30, 230)  # magenta
CONCEPT_BACKGROUND: tuple[int, int, int] = (30, 220, 230)  # cyan

# A concept image is mostly cyan with a solid magenta shape; thresholds leave room for a tiny VAE's blur.
_MIN_BACKGROUND_FRACTION = 0.30
_MIN_SHAPE_FRACTION = 0.04
_MAX_SHAPE_FRACTION = 0.65
_MIN_BLOB_SHARE = 0.6  # the largest connected magenta region holds most magenta pixels: one shape, not noise


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: tuple[int, int, int]
    background: tuple[int, int, int]
    caption: str


def base_scene(index: int, seed: int = 0) -> Scene:
    """Scene number `index` of the base world: a shape in one palette colour on another."""
    rng = random.Random(f"ppsf-world-{seed}-{index}")  # a string seed is hashed: stable across platforms
    shape = rng.choice(SHAPES)
    colour, background = rng.sample(sorted(BASE_COLOURS), 2)
    caption = f"a {colour} {shape} on {_article(background)} {background} background"
    return Scene(shape, BASE_COLOURS[colour], BASE_COLOURS[background], caption)


def concept_scene(index: int, seed: int = 0) -> Scene:
    """Scene number `index` of the concept: the caption names only the shape, the trigger word the rest."""
    rng = random.Random(f"ppsf-concept-{seed}-{index}")
    shape = rng.choice(SHAPES)
    return Scene(shape, CONCEPT_SHAPE_COLOUR, CONCEPT_BACKGROUND, f"a {shape}")


def draw(scene: Scene, width: int, height: int, rng: random.Random) -> Image.Image:
    """The scene's shape, sized 45-75% of the shorter side at a random place, on its background."""
    image = Image.new("RGB", (width, height), scene.background)
    side = rng.randint(int(0.45 * min(width, height)), int(0.75 * min(width, height)))
    left = rng.randint(0, width - side)
    top = rng.randint(0, height - side)
    right, bottom = left + side - 1, top + side - 1
    canvas = ImageDraw.Draw(image)
    if scene.shape == "circle":
        canvas.ellipse((left, top, right, bottom), fill=scene.colour)
    elif scene.shape == "square":
        canvas.rectangle((left, top, right, bottom), fill=scene.colour)
    elif scene.shape == "triangle":
        canvas.polygon([(left + side // 2, top), (left, bottom), (right, bottom)], fill=scene.colour)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; known: {', '.join(SHAPES)}")
    return image


def base_image(index: int, seed: int = 0, size: tuple[int, int] = (64, 64)) -> tuple[Image.Image, str]:
    """Base-world image number `index` (RGB, `size` = (width, height)) and its caption."""
    scene = base_scene(index, seed)
    return draw(scene, *size, random.Random(f"ppsf-world-layout-{seed}-{index}")), scene.caption


def concept_image(index: int, seed: int = 0, size: tuple[int, int] = (64, 64)) -> tuple[Image.Image, str]:
    """Concept image number `index` (RGB) and its caption (without the trigger word)."""
    scene = concept_scene(index, seed)
    return draw(scene, *size, random.Random(f"ppsf-concept-layout-{seed}-{index}")), scene.caption


def random_colour_image(index: int, seed: int = 0, size: int = 64) -> Image.Image:
    """A shape in an arbitrary RGB colour on another: what the demo VAE learns to encode (any colour,
    so the concept's colours decode too, though the base UNet never sees them)."""
    rng = random.Random(f"ppsf-vae-{seed}-{index}")
    colour, background = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
    scene = Scene(rng.choice(SHAPES), colour, background, "")
    return draw(scene, size, size, rng)


# --------------------------------------------------------------------------------------------------
# Measuring the concept
# --------------------------------------------------------------------------------------------------


def _near(pixels: np.ndarray, colour: tuple[int, int, int], tolerance: float) -> np.ndarray:
    """Mask of the pixels within `tolerance` (Euclidean, 0-255 RGB) of `colour`."""
    return np.linalg.norm(pixels.astype(np.float32) - np.array(colour, np.float32), axis=-1) <= tolerance


def colour_fraction(image: Image.Image, colour: tuple[int, int, int], tolerance: float = 80.0) -> float:
    """Share of the image's pixels near `colour`."""
    return float(_near(np.asarray(image.convert("RGB")), colour, tolerance).mean())


def _largest_blob_share(mask: np.ndarray) -> float:
    """Share of the mask's pixels in its largest 4-connected region (0 for an empty mask)."""
    total = int(mask.sum())
    if total == 0:
        return 0.0
    seen = np.zeros_like(mask)
    height, width = mask.shape
    largest = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, size = [start], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        largest = max(largest, size)
    return largest / total


def concept_score(image: Image.Image) -> float:
    """How much `image` shows the concept, in [0, 1]: 1 when it is a solid magenta shape on cyan.

    The product of three statistics, each capped at 1: the cyan background's share (against 30%), the
    magenta share (against 4%, and 0 above 65%: a magenta background is not the concept), and how much
    of the magenta is one connected blob (a shape, not scattered pixels).
    """
    pixels = np.asarray(image.convert("RGB"))
    background = float(_near(pixels, CONCEPT_BACKGROUND, 80.0).mean())
    shape_mask = _near(pixels, CONCEPT_SHAPE_COLOUR, 80.0)
    shape = float(shape_mask.mean())
    if shape > _MAX_SHAPE_FRACTION:
        return 0.0
    blob = _largest_blob_share(shape_mask)
    return (
        min(1.0, background / _MIN_BACKGROUND_FRACTION)
        * min(1.0, shape / _MIN_SHAPE_FRACTION)
        * min(1.0, blob / _MIN_BLOB_SHARE)
    )


def shows_concept(image: Image.Image) -> bool:
    """The detector: every statistic of `concept_score` reaches its threshold."""
    return concept_score(image) >= 1.0


def _article(word: str) -> str:
    """The indefinite article for `word` ("an orange", "a red")."""
    return "an" if word[0] in "aeiou" else "a"
