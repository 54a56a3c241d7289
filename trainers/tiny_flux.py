"""Tiny, offline-buildable Flux.1 and Flux.2 Klein pipelines, for tests and the Flux demo presets.

Configs from flux-notes §"Tiny offline models": every component has the real class, only small, and the
tokenizers' vocabularies are generated in code, so nothing is downloaded. Saved as diffusers folders and
loaded back through the adapters' real loading code. With ``pretrained=True`` the pipelines hold the
bundled demo weights (trainers/demo_weights/tiny-flux.safetensors, tiny-klein.safetensors, made by
``python -m trainers.demo_pretrain_flux``): the transformer knows the demo's base world
(trainers/demo_world.py); otherwise every weight is the random init of ``seed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from trainers.tiny_models import (
    CLIP_CONFIG,
    DEMO_WEIGHTS,
    TINY_VAE_BLOCKS,
    TOKENIZER_WORDS,
    _bytes_to_unicode,
    _load_demo_weights,
    build_pipeline_folder,
    learn_merges,
    make_clip_tokenizer,
    weights_identity,
)

if TYPE_CHECKING:
    from diffusers import Flux2KleinPipeline, FluxPipeline

T5_MAX_LENGTH = 32  # tiny: the pipelines pad every prompt to max_sequence_length tokens
QWEN_MAX_LENGTH = 64  # the chat template alone is ~40 byte tokens

T5_CONFIG: dict = dict(
    d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu", vocab_size=1000
)
# One group, as the SDXL VAE_CONFIG: the demo's mosaic VAE (trainers/demo_pretrain_flux.py) carries colours
# through every GroupNorm by keeping each pixel's channel sum at zero, which needs all channels in one group.
FLUX_VAE_CONFIG: dict = dict(
    TINY_VAE_BLOCKS,
    latent_channels=16,
    norm_num_groups=1,
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
KLEIN_VAE_CONFIG: dict = dict(TINY_VAE_BLOCKS, latent_channels=32, norm_num_groups=1)  # as FLUX_VAE_CONFIG
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

# The demo models (pretrained=True): 4 latent channels instead of the real 16 / 32, so a packed token is 16
# numbers, and an inner dim of 64. The transformer predicts each token's velocity through its inner dim: with
# 64 or 128 numbers per token (of which the mosaic VAE's colours fill 12) the width-32 test model cannot carry
# the noise it must remove, and its samples stay noisy.
_DEMO_LATENT_CHANNELS = 4
DEMO_FLUX_VAE_CONFIG: dict = dict(FLUX_VAE_CONFIG, latent_channels=_DEMO_LATENT_CHANNELS)
DEMO_FLUX_TRANSFORMER_CONFIG: dict = dict(
    FLUX_TRANSFORMER_CONFIG, in_channels=4 * _DEMO_LATENT_CHANNELS, num_attention_heads=4
)
DEMO_KLEIN_VAE_CONFIG: dict = dict(KLEIN_VAE_CONFIG, latent_channels=_DEMO_LATENT_CHANNELS)
DEMO_KLEIN_TRANSFORMER_CONFIG: dict = dict(
    KLEIN_TRANSFORMER_CONFIG, in_channels=4 * _DEMO_LATENT_CHANNELS, num_attention_heads=4
)

# The demo models' bundled weights (trainers/demo_pretrain_flux.py) and the modules they hold.
DEMO_FLUX_WEIGHTS = DEMO_WEIGHTS.parent / "tiny-flux.safetensors"
DEMO_KLEIN_WEIGHTS = DEMO_WEIGHTS.parent / "tiny-klein.safetensors"
FLUX_PARTS = ("text_encoder", "text_encoder_2", "vae", "transformer")
KLEIN_PARTS = ("text_encoder", "vae", "transformer")
PRETRAIN_COMMAND = "python -m trainers.demo_pretrain_flux"

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


def qwen_vocab_and_merges(words=TOKENIZER_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level BPE vocabulary and merges of make_qwen_tokenizer (plain Python: `check` sizes the
    demo's text encoder from it without importing transformers)."""
    byte_chars = _bytes_to_unicode()
    space = byte_chars[ord(" ")]
    spelled = [[byte_chars[b] for b in word.encode("utf-8")] for word in dict.fromkeys(words)]
    merges = learn_merges(
        [chars for chars in spelled if len(chars) > 1] + [[space, *chars] for chars in spelled]
    )
    vocab = {char: index for index, char in enumerate(byte_chars.values())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for token in QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return vocab, merges


def make_qwen_tokenizer(words=TOKENIZER_WORDS):
    """A byte-level BPE Qwen2 tokenizer with Qwen3's chat specials, whose merges make each of `words` one
    token (alone and after a space, "red" and " red"); any other text falls back to one token per byte."""
    from transformers import Qwen2TokenizerFast

    vocab, merges = qwen_vocab_and_merges(words)
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


def make_tiny_flux_pipeline(
    seed: int = 0, guidance_embeds: bool = True, pretrained: bool = False
) -> FluxPipeline:
    """An in-memory tiny Flux.1 pipeline (dev with `guidance_embeds`, else schnell), float32, eval mode.

    `pretrained` gives the demo model: the demo configs with the bundled weights (DEMO_FLUX_WEIGHTS, a dev
    model); otherwise the test configs with the random init of `seed`. The global torch RNG is untouched.
    """
    if not pretrained:
        return assemble_flux(seed, guidance_embeds, FLUX_VAE_CONFIG, FLUX_TRANSFORMER_CONFIG)
    if not guidance_embeds:
        raise ValueError("the bundled Flux.1 demo weights are a dev model (guidance_embeds=True)")
    pipe = assemble_flux(seed, True, DEMO_FLUX_VAE_CONFIG, DEMO_FLUX_TRANSFORMER_CONFIG)
    modules = {part: getattr(pipe, part) for part in FLUX_PARTS}
    _load_demo_weights(modules, DEMO_FLUX_WEIGHTS, f"{PRETRAIN_COMMAND} --family flux")
    return pipe


def assemble_flux(
    seed: int, guidance_embeds: bool, vae_config: dict, transformer_config: dict
) -> FluxPipeline:
    """A tiny Flux.1 pipeline with these VAE and transformer configs, every weight the random init of `seed`."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))
        text_encoder_2 = T5EncoderModel(T5Config(**T5_CONFIG))
        vae = AutoencoderKL(**vae_config)
        transformer = FluxTransformer2DModel(**transformer_config, guidance_embeds=guidance_embeds)
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


def make_tiny_klein_pipeline(
    seed: int = 0, is_distilled: bool = False, pretrained: bool = False
) -> Flux2KleinPipeline:
    """An in-memory tiny Flux.2 Klein pipeline, float32, eval mode.

    `pretrained` gives the demo model: the demo configs with the bundled weights (DEMO_KLEIN_WEIGHTS, trained
    as a base model); otherwise the test configs with the random init of `seed` (random VAE BatchNorm
    statistics too). The global torch RNG is untouched.
    """
    if not pretrained:
        return assemble_klein(seed, is_distilled, KLEIN_VAE_CONFIG, KLEIN_TRANSFORMER_CONFIG)
    pipe = assemble_klein(seed, is_distilled, DEMO_KLEIN_VAE_CONFIG, DEMO_KLEIN_TRANSFORMER_CONFIG)
    modules = {part: getattr(pipe, part) for part in KLEIN_PARTS}
    _load_demo_weights(modules, DEMO_KLEIN_WEIGHTS, f"{PRETRAIN_COMMAND} --family flux2")
    return pipe


def assemble_klein(
    seed: int, is_distilled: bool, vae_config: dict, transformer_config: dict
) -> Flux2KleinPipeline:
    """A tiny Flux.2 Klein pipeline with these VAE and transformer configs, every weight the random init of
    `seed`, the VAE's BatchNorm statistics random too."""
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
        vae = AutoencoderKLFlux2(**vae_config)
        # random statistics, so a missing or wrong normalisation changes what a test sees
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.5)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) * 2 + 0.5)
        transformer = Flux2Transformer2DModel(**transformer_config)
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


def build_tiny_flux(
    folder: Path, seed: int = 0, guidance_embeds: bool = True, pretrained: bool = False
) -> Path:
    """Build the tiny Flux.1 pipeline and save it (safetensors) to `folder`; return `folder`.

    `pretrained=True` is the demo model (demo://tiny-flux); the default, the random init of `seed`, is what
    tests build. Idempotent and atomic as build_tiny_sdxl: a folder built from other bundled weights (its
    marker file says which) is replaced.
    """
    identity = weights_identity(DEMO_FLUX_WEIGHTS, seed, pretrained)
    return build_pipeline_folder(
        folder, lambda: make_tiny_flux_pipeline(seed, guidance_embeds, pretrained), identity
    )


def build_tiny_klein(
    folder: Path, seed: int = 0, is_distilled: bool = False, pretrained: bool = False
) -> Path:
    """Build the tiny Flux.2 Klein pipeline and save it (safetensors) to `folder`; see build_tiny_flux."""
    identity = weights_identity(DEMO_KLEIN_WEIGHTS, seed, pretrained)
    return build_pipeline_folder(
        folder, lambda: make_tiny_klein_pipeline(seed, is_distilled, pretrained), identity
    )
