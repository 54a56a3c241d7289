"""The tiny offline SDXL pipeline (trainers/tiny_models.py): build, save, reload, infer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.tiny_models import (
    CLIP_CONFIG,
    TOKENIZER_WORDS,
    build_tiny_sdxl,
    make_clip_tokenizer,
    make_tiny_sdxl_pipeline,
)

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Run this module's torch ops on one thread, restoring the setting afterwards.

    The models are so small that every op is overhead; with other processes busy on the CPU, the
    multi-threaded ops stalled a 2-step inference for seconds, while one thread takes milliseconds.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline (seed 0) saved once for this module."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


def _generate(pipe, seed: int = 0) -> np.ndarray:
    """Return a 64x64 image (1, 64, 64, 3) from 2 Euler steps with a seeded generator."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        PROMPT, num_inference_steps=2, height=64, width=64, generator=generator, output_type="np"
    ).images


def test_saved_layout_is_safetensors_only(tiny_sdxl_dir: Path) -> None:
    files = sorted(p.relative_to(tiny_sdxl_dir).as_posix() for p in tiny_sdxl_dir.rglob("*") if p.is_file())
    assert files == [
        "demo_weights.txt",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model.safetensors",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    # Atomic build: the temporary sibling is gone.
    assert [p.name for p in tiny_sdxl_dir.parent.iterdir()] == ["tiny-sdxl"]


def test_reload_and_generate_deterministically(tiny_sdxl_dir: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)

    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.model_max_length == 77
    assert pipe.unet.config.cross_attention_dim == 64
    assert pipe.unet.config.projection_class_embeddings_input_dim == 80
    assert sum(p.numel() for p in pipe.unet.parameters()) == 1_028_708
    assert not any(m.training for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2))

    image = _generate(pipe)
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.float32
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    assert image.std() > 0.01  # not a constant image
    np.testing.assert_array_equal(_generate(pipe), image)
    # The in-memory build of the bundled weights is bit-identical to the saved and reloaded one.
    np.testing.assert_array_equal(_generate(make_tiny_sdxl_pipeline(seed=0, pretrained=True)), image)
    assert not np.array_equal(_generate(pipe, seed=1), image)


def test_lora_targets_exist_in_down_and_up_blocks(tiny_sdxl_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet", local_files_only=True)
    names = [name for name, _ in unet.named_modules()]
    for target in ("to_q", "to_k", "to_v", "to_out.0"):
        matching = [n for n in names if n.endswith("." + target)]
        assert any(n.startswith("down_blocks.") for n in matching), target
        assert any(n.startswith("up_blocks.") for n in matching), target


def test_build_is_idempotent_and_seeded(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    marker = tiny_sdxl_dir / "model_index.json"
    before = marker.stat().st_mtime_ns
    assert build_tiny_sdxl(tiny_sdxl_dir, seed=123) == tiny_sdxl_dir
    assert marker.stat().st_mtime_ns == before

    weights = "unet/diffusion_pytorch_model.safetensors"
    same = build_tiny_sdxl(tmp_path / "same", seed=0)
    random_init = build_tiny_sdxl(tmp_path / "random", seed=0, pretrained=False)
    random_again = build_tiny_sdxl(tmp_path / "random-again", seed=0, pretrained=False)
    other = build_tiny_sdxl(tmp_path / "other", seed=1, pretrained=False)
    assert (same / weights).read_bytes() == (tiny_sdxl_dir / weights).read_bytes()
    assert (random_init / weights).read_bytes() == (random_again / weights).read_bytes()
    assert (random_init / weights).read_bytes() != (tiny_sdxl_dir / weights).read_bytes()
    assert (other / weights).read_bytes() != (random_init / weights).read_bytes()


def test_a_demo_model_from_other_weights_is_replaced(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    """A folder built by an older release (other weights, or no marker) is rebuilt from the bundled weights;
    a random-init folder asked for again is kept."""
    weights = "unet/diffusion_pytorch_model.safetensors"
    stale = build_tiny_sdxl(tmp_path / "stale", seed=3, pretrained=False)
    (stale / "demo_weights.txt").unlink()  # as an older release left it
    assert build_tiny_sdxl(stale, seed=3, pretrained=False) == stale
    assert not (stale / "demo_weights.txt").exists()  # random init asked for: not rebuilt
    assert build_tiny_sdxl(stale) == stale
    assert (stale / weights).read_bytes() == (tiny_sdxl_dir / weights).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stale"]  # no temporary or old copy left


def test_build_keeps_global_rng_and_refuses_foreign_folder(tmp_path: Path) -> None:
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    pipe = make_tiny_sdxl_pipeline(seed=0)
    assert torch.equal(torch.rand(3), expected)
    # Constructed modules start in train mode; the builder must hand them out in eval mode.
    assert not any(m.training for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2))

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        build_tiny_sdxl(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_tokenizer_vocabulary() -> None:
    tokenizer = make_clip_tokenizer()
    assert tokenizer.tokenize(PROMPT + ", sks dog") == [
        "a</w>",
        "red</w>",
        "circle</w>",
        "on</w>",
        "a</w>",
        "blue</w>",
        "background</w>",
        ",</w>",
        "sks</w>",
        "dog</w>",
    ]
    # Merges learned jointly: no word's merges break another word ("re" from "red" inside "green").
    assert [tokenizer.tokenize(word) for word in TOKENIZER_WORDS] == [[w + "</w>"] for w in TOKENIZER_WORDS]
    # CLIP's legacy pooling (eos_token_id=2 in the config) takes argmax(input_ids): EOS must be the top id.
    assert tokenizer.eos_token_id == len(tokenizer) - 1 == max(tokenizer.get_vocab().values())
    assert tokenizer.bos_token_id == len(tokenizer) - 2
    assert len(tokenizer) <= CLIP_CONFIG["vocab_size"]
    ids = tokenizer("zebra!", padding="max_length", max_length=77).input_ids  # unknown word: byte pieces
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
