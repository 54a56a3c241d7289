"""Tiny, offline-buildable stand-ins for real models and data, for tests and the demo preset.

Nothing here downloads anything: the tiny SDXL pipeline is assembled from small configs with a
tokenizer whose vocabulary is generated in code, and the demo dataset is drawn with Pillow.
The configs follow environment-notes §2 ("Working config dicts", "Smallest configs that work").
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from trainers.atomic import atomic_write, atomic_write_text, temporary_sibling
from trainers.demo_world import concept_image

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

# Words that become single tokens, so demo captions and test prompts encode compactly. Any other text
# still tokenizes (byte-level fallback), just into more tokens.
TOKENIZER_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "sks", "ohwx", "dog", "cat",
    "person", "style", "red", "green", "blue", "yellow", "orange", "purple", "white", "black", "grey",
    "circle", "square", "triangle", "shape", "background", "small", "large",
)  # fmt: skip

TOKENIZER_MAX_LENGTH = 77

# Shared by text_encoder (CLIPTextModel) and text_encoder_2 (CLIPTextModelWithProjection).
# eos_token_id=2 selects CLIP's legacy pooling (argmax of input_ids); it finds EOS only because the
# tokenizer below gives <|endoftext|> the highest id.
CLIP_CONFIG: dict = dict(
    bos_token_id=0,
    eos_token_id=2,
    hidden_size=32,
    intermediate_size=37,
    layer_norm_eps=1e-05,
    num_attention_heads=4,
    num_hidden_layers=2,
    pad_token_id=1,
    vocab_size=1000,
    hidden_act="gelu",
    projection_dim=32,
    max_position_embeddings=TOKENIZER_MAX_LENGTH,
)

_ADDITION_TIME_EMBED_DIM = 8

# The notes' "(8,16), norm_num_groups=4, transformer_layers_per_block=(1,1)" row: 74,588 parameters,
# with cross-attention in down_blocks.1, up_blocks.0 and the mid block, so LoRA on to_q/to_k/to_v/to_out.0
# has targets on both sides of the UNet. The tests' model (random init): small, so the suite stays fast.
UNET_CONFIG: dict = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),  # diffusers' legacy name: this is the number of heads
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=_ADDITION_TIME_EMBED_DIM,
    transformer_layers_per_block=(1, 1),
    # SDXL's added embedding = 6 micro-conditioning values (each time-embedded) + text_encoder_2's pooled output.
    projection_class_embeddings_input_dim=6 * _ADDITION_TIME_EMBED_DIM + CLIP_CONFIG["projection_dim"],
    # SDXL concatenates the hidden states of both text encoders along the feature axis.
    cross_attention_dim=2 * CLIP_CONFIG["hidden_size"],
    norm_num_groups=4,
)
# The demo model's UNet (demo://tiny-sdxl, the bundled weights): 1,028,708 parameters. The (8, 16) UNet drew a
# caption's colours in 19% of held-out scenes after pretraining, this one in 94%, and only on a base that
# draws shapes cleanly does the demo LoRA put its concept in most samples.
DEMO_UNET_CONFIG: dict = dict(UNET_CONFIG, block_out_channels=(32, 64), norm_num_groups=8)

# Four blocks give vae_scale_factor 8 as in the real SDXL and Flux VAEs, so 64 px images map to 8x8
# latents; each family adds its latent channels, groups and normalisation (here and in tiny_flux.py).
TINY_VAE_BLOCKS: dict = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 8, 8, 8),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    sample_size=64,
)
VAE_CONFIG: dict = dict(
    TINY_VAE_BLOCKS,
    latent_channels=4,
    # One group: the demo VAE's weights (trainers/demo_pretrain.py) carry colours through every GroupNorm
    # by keeping each pixel's channel sum at zero, which needs all channels in one group.
    norm_num_groups=1,
    scaling_factor=0.13025,
)

SCHEDULER_CONFIG: dict = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
    num_train_timesteps=1000,
)

# The demo model's weights, pretrained on trainers/demo_world.py's base world by trainers/demo_pretrain.py.
DEMO_WEIGHTS = Path(__file__).parent / "demo_weights" / "tiny-sdxl.safetensors"
WEIGHTS_MARKER = "demo_weights.txt"  # in a built folder: which weights it was built from

DEMO_CONCEPT_FOLDER = "2_shapes"
DEMO_SIZES: tuple[tuple[int, int], ...] = ((64, 64), (96, 64), (64, 96))  # (width, height)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """Return GPT-2's byte -> printable character table, the alphabet of byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes)}


def _learn_bpe_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Return BPE merges (in rank order) that turn every word into a single ``word</w>`` symbol.

    Merges are learned the way BPE training does it (most frequent adjacent pair first), because
    hand-chained per-word merges interfere: an early ("r", "e") from "red" would split "green".
    Encoding applies merges by rank, so it replays this training and every word ends as one symbol.
    """
    byte_chars = _bytes_to_unicode()
    sequences: list[list[str]] = []
    for word in dict.fromkeys(words):
        chars = [byte_chars[b] for b in word.lower().encode("utf-8")]
        sequences.append(chars[:-1] + [chars[-1] + "</w>"])
    return learn_merges(sequences)


def learn_merges(sequences: list[list[str]]) -> list[tuple[str, str]]:
    """BPE training on symbol ``sequences``: merge the most frequent adjacent pair until each is one symbol."""
    merges: list[tuple[str, str]] = []
    while True:
        pair_counts: Counter[tuple[str, str]] = Counter()
        for seq in sequences:
            pair_counts.update(zip(seq, seq[1:]))
        if not pair_counts:
            return merges
        # Ties broken by the pair itself so the vocabulary is identical on every run.
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        merges.append(best)
        sequences = [_apply_merge(seq, best) for seq in sequences]


def _apply_merge(seq: list[str], pair: tuple[str, str]) -> list[str]:
    """Return ``seq`` with every left-to-right occurrence of ``pair`` fused into one symbol."""
    out: list[str] = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(seq[i] + seq[i + 1])
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def make_clip_tokenizer(words: Iterable[str] = TOKENIZER_WORDS) -> CLIPTokenizer:
    """Return a CLIP tokenizer with a tiny byte-level BPE vocabulary generated in code.

    The vocabulary holds the 256 byte characters, the same with ``</w>``, the merged symbols needed for
    ``words``, and then ``<|startoftext|>`` and ``<|endoftext|>`` as the two highest ids (see CLIP_CONFIG).
    """
    from transformers import CLIPTokenizer

    byte_chars = list(_bytes_to_unicode().values())
    symbols = byte_chars + [c + "</w>" for c in byte_chars]
    merges = _learn_bpe_merges(words)
    symbols += [left + right for left, right in merges]
    vocab: dict[str, int] = {}
    for symbol in [*symbols, "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(symbol, len(vocab))
    if len(vocab) > CLIP_CONFIG["vocab_size"]:
        raise ValueError(f"tokenizer vocabulary ({len(vocab)}) exceeds the text encoder's vocab_size")
    # Without an explicit model_max_length the tokenizer reports 1e30 and the SDXL pipeline pads to it.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TOKENIZER_MAX_LENGTH)


# --------------------------------------------------------------------------------------------------
# Tiny SDXL
# --------------------------------------------------------------------------------------------------


def make_tiny_sdxl_pipeline(
    seed: int = 0, pretrained: bool = False, demo_architecture: bool | None = None
) -> StableDiffusionXLPipeline:
    """Return an in-memory tiny SDXL pipeline (float32, CPU, every module in eval mode).

    ``pretrained`` gives the demo model: DEMO_UNET_CONFIG with the bundled weights (DEMO_WEIGHTS, made by
    ``python -m trainers.demo_pretrain``: the model knows the demo's base world); otherwise the tests'
    UNET_CONFIG with a random init that depends only on ``seed`` (``demo_architecture=True``: the demo's
    architecture, randomly initialised, as its pretraining starts). The caller's global torch RNG state is
    left untouched.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Construction order fixes which random numbers each module gets; keep it stable.
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_CONFIG))
        vae = AutoencoderKL(**VAE_CONFIG)
        demo = pretrained if demo_architecture is None else demo_architecture
        unet = UNet2DConditionModel(**(DEMO_UNET_CONFIG if demo else UNET_CONFIG))

    # Freshly constructed modules start in train mode (dropout active) while from_pretrained returns
    # eval mode; eval here keeps in-memory and reloaded pipelines bit-identical.
    for module in (text_encoder, text_encoder_2, vae, unet):
        module.eval()
    if pretrained:
        _load_demo_weights(
            {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "vae": vae, "unet": unet}
        )

    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=make_clip_tokenizer(),
        tokenizer_2=make_clip_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        add_watermarker=False,
    )


def _load_demo_weights(
    modules: dict[str, torch.nn.Module],
    weights_file: Path = DEMO_WEIGHTS,
    rebuild: str = "python -m trainers.demo_pretrain",
) -> None:
    """Load ``weights_file`` (keys "<module>.<parameter>", fp16) into ``modules`` as float32, every key
    required and none left over; ``rebuild`` is the command that makes the file."""
    import torch
    from safetensors.torch import load_file

    if not weights_file.is_file():
        raise FileNotFoundError(
            f"{weights_file} is missing (it ships with the repository); rebuild it with `{rebuild}`"
        )
    weights = load_file(weights_file)
    for name, module in modules.items():
        prefix = f"{name}."
        state = {
            k.removeprefix(prefix): v.to(torch.float32) for k, v in weights.items() if k.startswith(prefix)
        }
        module.load_state_dict(state, strict=True)
    unknown = {key.split(".", 1)[0] for key in weights} - set(modules)
    if unknown:
        raise ValueError(f"{weights_file} holds weights for unknown modules: {sorted(unknown)}")


def build_tiny_sdxl(folder: Path, seed: int = 0, pretrained: bool = True) -> Path:
    """Build a tiny SDXL pipeline and save it (safetensors) to ``folder``; return ``folder``.

    By default it holds the bundled pretrained weights (the demo model); ``pretrained=False`` gives the
    random init of ``seed``.

    Idempotent: if ``folder`` holds a pipeline built from the same weights (its WEIGHTS_MARKER file says
    which) nothing is rebuilt; a demo model built from other bundled weights (an older release) is
    replaced, the old copy removed only once the new one is in place. The pipeline is saved into a hidden
    temporary sibling and renamed into place, so ``folder`` is either complete or absent.
    Raises FileExistsError if ``folder`` exists, is not empty and holds no pipeline.
    """
    identity = weights_identity(DEMO_WEIGHTS, seed, pretrained)
    return build_pipeline_folder(folder, lambda: make_tiny_sdxl_pipeline(seed, pretrained), identity)


def build_pipeline_folder(folder: Path, make, identity: str) -> Path:
    """Save the pipeline ``make()`` returns into ``folder`` (safetensors) unless it already holds one built
    from ``identity`` (its WEIGHTS_MARKER file); a random init (identity "random init, ...") is kept as
    found. A folder built from other weights is replaced, the old copy removed only once the new one is
    in place. Saved into a hidden temporary sibling and renamed into place: complete or absent.
    """
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        marker = folder / WEIGHTS_MARKER
        random_init = identity.startswith("random init")
        if random_init or (marker.is_file() and marker.read_text(encoding="utf-8") == identity):
            return folder
    else:
        _check_replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)

    tmp = temporary_sibling(folder)
    try:
        make().save_pretrained(tmp, safe_serialization=True)
        (tmp / WEIGHTS_MARKER).write_text(identity, encoding="utf-8")
        if (folder / "model_index.json").is_file():
            _replace(folder, tmp)
        else:
            _move_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (folder / "model_index.json").is_file():
        raise FileExistsError(f"{folder} exists but holds no pipeline (no model_index.json)")
    return folder


def weights_identity(weights_file: Path, seed: int, pretrained: bool) -> str:
    """What a built folder's weights come from: the bundled file's digest, or the random init's seed."""
    if not pretrained:
        return f"random init, seed {seed}\n"
    return f"{weights_file.name} sha256 {hashlib.sha256(weights_file.read_bytes()).hexdigest()}\n"


def _replace(folder: Path, new: Path) -> None:
    """Swap the complete ``new`` folder in for ``folder``; the old one is deleted only after the swap."""
    old = temporary_sibling(folder)
    os.rename(folder, old)
    os.rename(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(folder: Path) -> None:
    """Raise FileExistsError unless ``folder`` is absent or an empty directory."""
    if folder.is_dir() and not any(folder.iterdir()):
        return
    if folder.exists():
        raise FileExistsError(f"{folder} exists and is not an empty folder; refusing to overwrite it")


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``; if another process got there first, keep its copy."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    try:
        os.rename(tmp, folder)
    except OSError:
        # A concurrent builder won the race; its result is equivalent (same configs), so ours is dropped
        # by the caller's cleanup. Anything else leaves folder incomplete and the caller reports it.
        if not folder.exists():
            raise


# --------------------------------------------------------------------------------------------------
# Demo dataset
# --------------------------------------------------------------------------------------------------


def write_demo_dataset(folder: Path, num_images: int = 12, seed: int = 0) -> Path:
    """Write the demo's concept dataset (make_demo_image) under ``folder/2_shapes``; return ``folder``.

    Each image ``shape_NNN.png`` has a caption ``shape_NNN.txt`` such as "a circle"; sizes cycle through
    64x64, 96x64 and 64x96. Image NNN depends only on (seed, NNN), so the output is deterministic and a
    repeated call only writes files that are missing or differ (the demo of an older release is brought
    up to date). A fresh concept folder is built in a hidden temporary sibling and renamed into place.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    folder = Path(folder)
    concept = folder / DEMO_CONCEPT_FOLDER
    if concept.is_dir():
        _write_demo_files(concept, num_images, seed)
        return folder

    folder.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(concept)
    try:
        tmp.mkdir()
        _write_demo_files(tmp, num_images, seed)
        _move_into_place(tmp, concept)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_demo_files(concept: Path, num_images: int, seed: int) -> None:
    """Write every image/caption pair that is missing or differs (a dataset from an older release) into
    ``concept``, each file atomically; files that are already right are not touched."""
    for index in range(num_images):
        image_path = concept / f"shape_{index:03d}.png"
        caption_path = image_path.with_suffix(".txt")
        image, caption = make_demo_image(index, seed)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        png = buffer.getvalue()
        if not (image_path.is_file() and image_path.read_bytes() == png):
            atomic_write(image_path, lambda tmp, png=png: tmp.write_bytes(png))
        if not (caption_path.is_file() and caption_path.read_text(encoding="utf-8") == caption + "\n"):
            atomic_write_text(caption_path, caption + "\n")


def make_demo_image(index: int, seed: int = 0) -> tuple[Image.Image, str]:
    """Return demo image number ``index`` (RGB) and its caption; the same arguments give the same image.

    The demo teaches a concept the pretrained demo model has never seen (trainers/demo_world.py): a
    magenta shape on a cyan background. The caption names only the shape ("a circle"); the preset's
    trigger word stands for the rest.
    """
    return concept_image(index, seed, DEMO_SIZES[index % len(DEMO_SIZES)])
