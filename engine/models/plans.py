"""Memory plans: how each phase fits a GPU of a given size, and what it is predicted to peak at.

A plan only chooses among what the ecosystem already has: staged loading (one component at a
time), bitsandbytes 8/4-bit weights (`BitsAndBytesConfig`), diffusers group offloading with
CUDA streams, VAE tiling/slicing, and, ours, running each block over a few rows at a time
(engine.hooks.row_groups). Predictions are weights (counted exactly on the meta device) plus
activations per row (a per-token constant measured by the benchmarks, in benchmarks/results/).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cache.sizes import parse_size
from engine.errors import SettingsError

if TYPE_CHECKING:
    from engine.models.model_info import ModelInfo

GiB = 1 << 30


@dataclass(frozen=True)
class Plan:
    name: str
    summary: str
    transformer_weights: str = "bf16"  # bf16 | int8 | nf4
    text_encoder_weights: str = "bf16"  # bf16 | int8 | nf4
    offload: str = "none"  # none | block (diffusers group offloading, one block per group, streams)
    row_group: int = 0  # rows per block call (engine.hooks.row_groups); 0 = the whole batch at once
    ff_chunk: int = 0  # tokens per feed-forward slice; 0 = unsliced (see engine.hooks.ff_chunking)

    @property
    def needs_cuda(self) -> bool:
        return self.transformer_weights != "bf16" or self.text_encoder_weights != "bf16" or self.offload != "none"

    @property
    def needs_bitsandbytes(self) -> bool:
        return self.transformer_weights != "bf16" or self.text_encoder_weights != "bf16"


# The one description of each plan: `cogedit plan` prints it and tests/test_plans.py checks that the
# README's table says the same (the cards each plan gets come from `card_sizes`, not from here).
PLANS: dict[str, Plan] = {
    p.name: p
    for p in (
        Plan("staged", "one component at a time, bf16, nothing offloaded"),
        Plan(
            "lean", "staged, but every block runs one row at a time (the reference row first, its K/V held for the edit rows), sliced MLPs; same result",
            row_group=1, ff_chunk=2048,
        ),
        Plan("int8", "8-bit transformer and T5 (bitsandbytes), sliced MLPs", "int8", "int8", ff_chunk=4096),
        Plan("nf4", "4-bit transformer and T5 (bitsandbytes nf4), sliced MLPs", "nf4", "nf4", ff_chunk=4096),
        Plan("offload", "bf16 weights streamed block by block from CPU memory (diffusers group offloading, CUDA streams)", offload="block", ff_chunk=4096),
    )
}
# --vram tries plans in this order, fastest first.
_BY_SPEED = ("staged", "lean", "int8", "offload", "nf4")


_BYTES_PER_PARAM = {"bf16": 2.0, "int8": 1.02, "nf4": 0.56}
# Allocator peaks measured on an H100 at 49x480x720 (benchmarks/results/run_a.json): one row
# through the transformer costs 82.4 kB per token, of which the MLP's 4x-wide intermediate and
# its GELU copy are 16 x width bytes (only a slice of tokens when the MLP is chunked); the
# VAE with tiling and slicing peaks at 2.45 GiB encoding and 4.22 GiB decoding.
ACT_BYTES_PER_ROW_TOKEN = 82_450
MLP_BYTES_PER_TOKEN = 16 * 3072
VAE_ENCODE_TILED = 2.45 * GiB
# bitsandbytes' int8 matmuls keep int8 copies of the activations: measured 9.60 GiB against 7.51
# predicted without them (run_d).
INT8_BUFFERS = int(2.1 * GiB)
CUDA_CONTEXT = GiB // 2  # what the CUDA context takes on a card, outside the allocator
VAE_DECODE_TILED = 4.22 * GiB
# The tiles are a fixed size, so a longer or larger clip adds only whole-video tensors to those
# peaks: the bf16 video itself, the tiles' decoded rows before blending (overlapping, ~1.2x) and
# the blended result; counted as 3 copies of the video beyond the 49x480x720 one measured above
# (an estimate until benchmarks/cogvideox15.py measures 81x768x1360).
VAE_VIDEO_COPIES = 3
_MEASURED_VIDEO = 49 * 480 * 720


def vae_peak(measured: float, w: Workload) -> int:
    """A VAE phase's peak for workload `w`, from its peak measured at 49x480x720."""
    extra = max(0, w.frames * w.height * w.width - _MEASURED_VIDEO) * 3 * 2  # RGB, bf16
    return int(measured + VAE_VIDEO_COPIES * extra)


def get_plan(name: str) -> Plan:
    if name not in PLANS:
        raise SettingsError(f"unknown --plan {name!r}: choose one of {', '.join(PLANS)} (`cogedit plan --vram SIZE` picks one)")
    return PLANS[name]


@functools.lru_cache(maxsize=8)
def _param_count(part: str, config_items: tuple) -> int:
    from engine.hooks.libraries import import_model_libraries

    import_model_libraries()
    config = dict(config_items)
    import torch  # here, not at the top: `cogedit plan` never counts and needs no torch

    with torch.device("meta"):
        if part == "transformer":
            from diffusers import CogVideoXTransformer3DModel

            model = CogVideoXTransformer3DModel.from_config(config)
        elif part == "text_encoder":
            from transformers import T5Config, T5EncoderModel

            model = T5EncoderModel(T5Config(**config))
        else:
            from diffusers import AutoencoderKLCogVideoX

            model = AutoencoderKLCogVideoX.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _hashable(config: dict) -> tuple:
    # Config files carry bookkeeping keys (_class_name, architectures, ...) the classes don't take.
    skip = ("architectures", "transformers_version", "dtype", "torch_dtype")
    kept = {k: v for k, v in config.items() if not isinstance(v, dict) and not k.startswith("_") and k not in skip}
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kept.items()))


def param_counts(info: ModelInfo) -> dict[str, int]:
    if info.known_params is not None:
        return dict(info.known_params)
    return {
        "transformer": _param_count("transformer", _hashable(info.transformer_config)),
        "text_encoder": _param_count("text_encoder", _hashable(info.text_encoder_config)),
        "vae": _param_count("vae", _hashable(info.vae_config)),
    }


@dataclass(frozen=True)
class Workload:
    """What a run processes: sizes that drive activation memory."""

    frames: int = 49
    height: int = 480
    width: int = 720
    prompts: int = 1
    cfg: bool = True  # edit guidance > 1
    invert_rows: int = 1  # 2 when the inversion's source and negative prompts differ (CFG)
    reference: str = "shared"  # shared | per-half | stored


def sequence_tokens(info: ModelInfo, frames: int, height: int, width: int) -> int:
    """Text + image tokens the transformer sees for `frames` frames at height x width (for 1.5,
    its latent frames padded to even, two to a token)."""
    p = info.transformer_config["patch_size"]
    latent_frames = info.latent_frames(frames) // info.patch_size_t
    return info.text_length + latent_frames * (height // info.vae_scale_spatial // p) * (width // info.vae_scale_spatial // p)


def predict_peaks(plan: Plan, info: ModelInfo, w: Workload = Workload()) -> dict[str, int]:
    """Predicted peak GPU bytes per phase for `plan` on workload `w`."""
    counts = param_counts(info)
    tokens = sequence_tokens(info, w.frames, w.height, w.width)
    cfg = info.transformer_config
    block_params = counts["transformer"] / cfg["num_layers"]

    def weights(part: str, quant: str) -> float:
        return counts[part] * _BYTES_PER_PARAM[quant]

    def transformer(rows: int, ref_rows: int = 0) -> float:
        resident = 3 * block_params * 2 if plan.offload == "block" else weights("transformer", plan.transformer_weights)
        mlp_tokens = min(tokens, plan.ff_chunk) if plan.ff_chunk else tokens
        per_row = tokens * (ACT_BYTES_PER_ROW_TOKEN - MLP_BYTES_PER_TOKEN) + mlp_tokens * MLP_BYTES_PER_TOKEN
        if not plan.row_group:
            return resident + rows * per_row + (INT8_BUFFERS if plan.transformer_weights == "int8" else 0)
        # Row groups (engine.hooks.row_groups): the whole batch's hidden states, the reference group's
        # K/V held for the block's edit groups, and one group's temporaries, about five hidden
        # states per row (its normed input, attention output, MLP output, head slices). Measured:
        # 11.32 GiB allocated, 11.40 reserved for 3 rows in groups of 1 (run_k); this says 11.39.
        hidden = tokens * cfg["num_attention_heads"] * cfg["attention_head_dim"] * 2
        return resident + rows * hidden + 2 * ref_rows * hidden + 5 * min(rows, plan.row_group) * hidden

    edit_rows = w.prompts * (2 if w.cfg else 1)
    ref_rows = {"shared": 1, "per-half": edit_rows, "stored": 0}[w.reference]
    t5 = 3 * weights("text_encoder", "bf16") / 24 if plan.offload == "block" else weights("text_encoder", plan.text_encoder_weights)
    return {
        "encode": vae_peak(VAE_ENCODE_TILED, w),
        "embed": int(t5 + 0.1 * GiB),
        "invert": int(transformer(w.invert_rows)),
        "edit": int(transformer(edit_rows + ref_rows, ref_rows)),
        "decode": vae_peak(VAE_DECODE_TILED, w),
    }


_VRAM_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)


def parse_vram(text: str) -> int:
    """A GPU's memory as written on the card, in bytes. Cards are sold in binary units under
    decimal names (a "12 GB" card has 12 GiB), so GB means GiB here, unlike --max-size; a bare
    number is GB: "12GB", "12GiB", "12G" and "12" are all 12 * 2**30."""
    match = _VRAM_RE.fullmatch(text) if isinstance(text, str) else None
    prefix, suffix = (match.group(2).lower(), (match.group(3) or "").lower()) if match else ("", "")
    # Cards are sold in GB: "24MB" is a slip, not a card (it would fit no plan), so it is refused.
    if match is None or not (prefix in ("g", "t") or not (prefix or suffix)):
        raise ValueError(f"cannot read --vram {text!r}: write the card's memory in GB, e.g. 12GB, 12 or 16GiB (GB on a card means GiB)")
    return parse_size(match.group(1) + (prefix or "g"))  # a bare number is GB; a bare letter is binary in parse_size


def choose_plan(vram_bytes: int, info: ModelInfo, w: Workload = Workload()) -> Plan:
    """The first plan, fastest first, whose predicted peak fits a card of `vram_bytes` (see
    parse_vram) less the CUDA context, which the allocator does not see."""
    for name in _BY_SPEED:
        plan = PLANS[name]
        if max(predict_peaks(plan, info, w).values()) <= vram_bytes - CUDA_CONTEXT:
            return plan
    raise SettingsError(
        f"no plan fits {vram_bytes / GiB:.1f} GiB for {w.frames} frames at {w.height}x{w.width}; "
        "use fewer --frames or a smaller --height/--width"
    )


def card_sizes(info: ModelInfo, w: Workload = Workload(), largest: int = 80) -> dict[str, str]:
    """Which cards (whole GB, as sold, up to `largest`) `--vram` gives each plan on workload `w`,
    e.g. {"lean": "12-14 GB", "staged": "15 GB and up"}; a plan it never picks (a faster one fits the same cards) is "by name only"."""
    sizes: dict[str, list[int]] = {name: [] for name in PLANS}
    for gb in range(1, largest + 1):
        try:
            sizes[choose_plan(gb * GiB, info, w).name].append(gb)
        except SettingsError:
            pass  # no plan fits a card this small
    out = {}
    for name, gbs in sizes.items():
        if not gbs:
            out[name] = "by name only"
        elif gbs[-1] == largest:
            out[name] = f"{gbs[0]} GB and up"
        else:
            out[name] = f"{gbs[0]} GB" if gbs[0] == gbs[-1] else f"{gbs[0]}-{gbs[-1]} GB"
    return out
