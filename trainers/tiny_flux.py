"""Tiny, offline-buildable Flux.1 and Flux.2 Klein pipelines, for tests and the Flux demo presets.

Configs from flux-notes §"Tiny offline models": every component has the real class, only small, and the
tokenizers' vocabularies are generated in code, so nothing is downloaded. Saved as diffusers folders and
loaded back through the adapters' real loading code.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from trainers.atomic import temporary_sibling
from trainers.tiny_models import (
    CLIP_CONFIG,
    TINY_VAE_BLOCKS,
    TOKENIZER_WORDS,
    _bytes_to_unicode,
    _check_replaceable,
    _move_into_place,
    make_clip_tokenizer,
)

if TYPE_CHECKING:
    from diffusers import Flux2KleinPipeline, FluxPipeline

T5_MAX_LENGTH = 32  # tiny: the pipelines pad every prompt to max_sequence_length tokens
QWEN_MAX_LENGTH = 64  # the chat template alone is ~40 byte tokens

T5_CONFIG: dict = dict(
    d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu", vocab_size=1000
)
FLUX_VAE_CONFIG: dict = dict(
    TINY_VAE_BLOCKS,
    latent_channels=16,
    norm_num_groups=4,
    scaling_factor=0.3611,  # Flux.1's real values, so the (z - shift) * scale normalisation is exercised
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
FLUX_TRANSFORMER_CONFIG: dict = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=T5_CONFIG["d_model"],
    pooled_projection_dim=CLIP_CONFIG["hidden_size"],
    axes_dims_rope=(4, 6, 6),
)
FLUX_SCHEDULER_CONFIG: dict = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
    max_image_seq_len=4096,
)  # fmt: skip

QWEN_CONFIG: dict = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=27,  # so that hidden states 9, 18 and 27 exist
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    tie_word_embeddings=True,
    max_position_embeddings=QWEN_MAX_LENGTH,
)
KLEIN_VAE_CONFIG: dict = dict(TINY_VAE_BLOCKS, latent_channels=32, norm_num_groups=4)
KLEIN_TRANSFORMER_CONFIG: dict = dict(
    patch_size=1,
    in_channels=128,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=3 * QWEN_CONFIG["hidden_size"],  # hidden states of 3 layers, concatenated
    axes_dims_rope=(4, 4, 4, 4),
    guidance_embeds=False,
)

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's template reduced to what the Klein pipeline uses: one user turn, the generation prompt and,
# with enable_thinking=False, the empty think block.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def make_t5_tokenizer(words=TOKENIZER_WORDS):
    """A T5 (unigram) tokenizer over `words` plus single characters, so any text tokenizes."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{word}", -3.0) for word in dict.fromkeys(words)]
    vocab += [(chr(c), -8.0) for c in range(ord("a"), ord("z") + 1)]
    vocab += [(c, -8.0) for c in "0123456789.,'-!?"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def make_qwen_tokenizer():
    """A byte-level BPE Qwen2 tokenizer (no merges: one token per byte) with Qwen3's chat specials."""
    from transformers import Qwen2TokenizerFast

    vocab = {char: index for index, char in enumerate(_bytes_to_unicode().values())}
    # one merge so the BPE model is well-formed; merges must be tuples for the fast tokenizer
    merges = [("Ġ", "a")]
    vocab["Ġa"] = len(vocab)
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=QWEN_MAX_LENGTH,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------


def make_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """An in-memory tiny Flux.1 pipeline (dev with `guidance_embeds`, else schnell), float32, eval mode."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))
        text_encoder_2 = T5EncoderModel(T5Config(**T5_CONFIG))
        vae = AutoencoderKL(**FLUX_VAE_CONFIG)
        transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER_CONFIG, guidance_embeds=guidance_embeds)
    for module in (text_encoder, text_encoder_2, vae, transformer):
        module.eval()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=make_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=make_t5_tokenizer(),
        transformer=transformer,
    )


def make_tiny_klein_pipeline(seed: int = 0, is_distilled: bool = False) -> Flux2KleinPipeline:
    """An in-memory tiny Flux.2 Klein pipeline, float32, eval mode, with random VAE BatchNorm statistics."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = make_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**QWEN_CONFIG, vocab_size=len(tokenizer)))
        vae = AutoencoderKLFlux2(**KLEIN_VAE_CONFIG)
        # random statistics, so a missing or wrong normalisation changes what a test sees
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.5)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) * 2 + 0.5)
        transformer = Flux2Transformer2DModel(**KLEIN_TRANSFORMER_CONFIG)
    for module in (text_encoder, vae, transformer):
        module.eval()
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=is_distilled,
    )


def build_tiny_flux(folder: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Build the tiny Flux.1 pipeline and save it (safetensors) to `folder`; see `_build`."""
    return _build(folder, lambda: make_tiny_flux_pipeline(seed, guidance_embeds))


def build_tiny_klein(folder: Path, seed: int = 0, is_distilled: bool = False) -> Path:
    """Build the tiny Flux.2 Klein pipeline and save it (safetensors) to `folder`; see `_build`."""
    return _build(folder, lambda: make_tiny_klein_pipeline(seed, is_distilled))


def _build(folder: Path, make) -> Path:
    """Save `make()` into `folder` through a temporary sibling; idempotent like build_tiny_sdxl."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    _check_replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(folder)
    try:
        make().save_pretrained(tmp, safe_serialization=True)
        _move_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (folder / "model_index.json").is_file():
        raise FileExistsError(f"{folder} exists but holds no pipeline (no model_index.json)")
    return folder
