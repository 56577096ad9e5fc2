"""Tiny random CogVideoX checkpoints in the real `CogVideoX-5b` (or `CogVideoX1.5-5b`) folder layout.

Tests and the demo need a model without a hub: these are built on the spot and written with
`save_pretrained`, so the same `from_pretrained(..., subfolder=...)` code that loads the real
model loads them. The architecture keeps what matters to the engine (rotary embeddings, 8x
spatial and 4x temporal VAE compression, a T5 encoder, the 5B scheduler config; for 1.5, time
patched by 2 and its rotary grid) at toy widths.
"""

from __future__ import annotations

import json
import math
import string
from collections import Counter
from pathlib import Path

import torch

from engine.errors import SettingsError
from engine.models.configs import SCHEDULER_5B, T5_XXL, TRANSFORMER_5B, TRANSFORMER_15, VAE_5B
from engine.models.model_info import DEFAULTS_KEY
from engine.video.clips import CLIPS

TINY_TEXT_LEN = 226  # same max length as the real model: the prompt path is the real one
ARCHS = {"1.0": TRANSFORMER_5B, "1.5": TRANSFORMER_15}
# The tiny models' own size (12x20 latents); written into model_index.json so that a run without
# --frames/--height/--width uses it. 9 frames are 3 latent frames: odd, so 1.5 pads them.
TINY_DEFAULTS = {"frames": 9, "height": 96, "width": 160}


def train_tokenizer(save_dir: Path, extra: tuple[str, ...] | list[str] = ()) -> None:
    """A T5-style tokenizer over a few sentences (the real one is sentencepiece, 32k words).

    A unigram model whose pieces are the corpus's whole words, scored by frequency, plus single
    characters as a fallback, so the proxy's captions read as words and any prompt still
    tokenizes. Under 200 pieces: the random tiny model's T5 has 200 rows.
    (A trained unigram model prunes a corpus this small down to letters.) `extra` sentences add
    their words (the shapes proxy's captions)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "a watercolor painting of a city street at dusk",
        "replace the car with a bicycle, cinematic lighting",
        "change the background to a forest in autumn",
        "a rabbit in a meadow, pixar style, sunny day",
        "people riding bikes down a road, high quality video",
        "make it a charcoal sketch, black and white, snow, night, neon",
        *(caption for clip in CLIPS for caption in clip.captions),
        *extra,
    ]
    words = Counter(word.strip(",") for line in corpus for word in line.split())
    total = sum(words.values())
    chars = sorted(set("".join(corpus)) - {" "} | set(string.ascii_lowercase + string.digits + ".,;:!?'-"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{word}", math.log(count / total)) for word, count in words.most_common()]
    pieces += [("\u2581", -20.0)] + [(c, -30.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    # T5 appends </s> to every sequence.
    eos = tok.token_to_id("</s>")
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TINY_TEXT_LEN,
    )
    fast.save_pretrained(save_dir)


def build_tiny_model(path: str | Path, seed: int = 0, rotary: bool = True, layers: int = 2, arch: str = "1.0") -> Path:
    """Write a tiny random CogVideoX checkpoint to `path` and return it.

    `rotary=False` writes a 2B-like model (learned-free sincos positions), which the engine refuses;
    `layers` more blocks show what repeats per block (compiled graphs); `arch` "1.5" a
    CogVideoX1.5-5B-like one (time patched by 2, a rotary grid of up to 40x40 latent cells).
    """
    if arch not in ARCHS:
        raise SettingsError(f"--arch {arch!r}: choose {' or '.join(ARCHS)} (CogVideoX-5B or CogVideoX1.5-5B)")
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import T5Config, T5EncoderModel
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # its shard-writing bar would mix into the CLI's output
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    # The 5B configuration at toy widths: rotary embeddings, patching and interpolation as in 5B.
    # 1.5's sample size is its rotary grid's limit, not its working size (engine.models.model_info).
    sample = {"sample_width": 20, "sample_height": 12} if arch == "1.0" else {"sample_width": 40, "sample_height": 40}
    transformer = CogVideoXTransformer3DModel(
        **{
            **ARCHS[arch],
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "time_embed_dim": 16,
            "text_embed_dim": 32,
            "num_layers": layers,
            **sample,
            "sample_frames": TINY_DEFAULTS["frames"],
            "max_text_seq_length": TINY_TEXT_LEN,
            "use_rotary_positional_embeddings": rotary,
        }
    )
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 16, 16),
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=4,
        sample_height=96,
        sample_width=160,
        scaling_factor=0.7,
    )
    text_encoder = T5EncoderModel(
        T5Config(**{**T5_XXL, "vocab_size": 200, "d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2, "pad_token_id": 0, "eos_token_id": 1})
    )
    scheduler = CogVideoXDDIMScheduler(**SCHEDULER_5B)

    transformer.save_pretrained(path / "transformer", safe_serialization=True)
    vae.save_pretrained(path / "vae", safe_serialization=True)
    text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    scheduler.save_pretrained(path / "scheduler")
    train_tokenizer(path / "tokenizer")
    write_model_index(path, {**TINY_DEFAULTS, "fps": 16.0 if arch == "1.5" else 8.0})
    return path


def write_model_index(path: Path, defaults: dict | None = None) -> None:
    """model_index.json as the hub repository has it, so a diffusers pipeline can load the folder too.

    `defaults` (frames, height, width, fps) are the size and rate the model works at, for runs
    that name none (engine.models.model_info.ModelInfo.defaults); diffusers skips "_" keys."""
    index = {
        "_class_name": "CogVideoXPipeline",
        "_diffusers_version": "0.30.0",
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
        **({DEFAULTS_KEY: defaults} if defaults else {}),
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def small_init(module: torch.nn.Module) -> torch.nn.Module:
    """Small random weights, in place: default inits make 42 random blocks overflow in bf16."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return module


def random_transformer(device: str, dtype: torch.dtype = torch.bfloat16, **overrides) -> torch.nn.Module:
    """The CogVideoX-5B transformer (or `overrides` of its config) with small random weights, built
    on `device`: benchmarks get the real model's sizes and speed without a checkpoint."""
    from diffusers import CogVideoXTransformer3DModel

    with torch.device(device):
        model = CogVideoXTransformer3DModel(**{**TRANSFORMER_5B, **overrides}).to(dtype)
    return small_init(model).eval().requires_grad_(False)


def write_random_5b(path, device: str = "cuda", dtype=None, seed: int = 0, arch: str = "1.0"):
    """Write a CogVideoX-5B-shaped (`arch` "1.5": CogVideoX1.5-5B) checkpoint with random weights
    (benchmarks: real sizes, noise pixels).

    Weights are drawn on `device` (fast) and saved with `save_pretrained` in the hub layout, so
    the engine loads them through the same code as the real model.
    """
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler
    from transformers import T5Config, T5EncoderModel

    dtype = dtype or torch.bfloat16
    path = Path(path)
    torch.manual_seed(seed)

    transformer = random_transformer(device, dtype, **ARCHS[arch])
    transformer.save_pretrained(path / "transformer", safe_serialization=True, max_shard_size="5GB")
    del transformer
    with torch.device(device):
        t5 = small_init(T5EncoderModel(T5Config(**T5_XXL)).to(dtype))
    t5.save_pretrained(path / "text_encoder", safe_serialization=True, max_shard_size="5GB")
    del t5
    with torch.device(device):
        vae = AutoencoderKLCogVideoX(**VAE_5B).to(dtype)
    vae.save_pretrained(path / "vae", safe_serialization=True)
    del vae
    CogVideoXDDIMScheduler(**SCHEDULER_5B).save_pretrained(path / "scheduler")
    # A toy vocabulary is enough: token ids stay below the model's 32128.
    train_tokenizer(path / "tokenizer")
    write_model_index(path)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path
