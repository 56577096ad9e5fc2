"""One call of the CogVideoX transformer on a batch of latent rows, shared by inversion and edit.

CogVideoX1.5 patches time by 2 (`patch_size_t`): its transformer takes an even number of latent
frames, and a 4k+1-frame clip has (F-1)/4+1 of them, odd for 49, 81 or 161 frames. `predict`
pads the rows it is given at the start, with copies of their first latent frame, up to a multiple
of patch_size_t, and drops the predictions for those frames, so everything around it (the
trajectory, the cache, masks, the decoder) keeps the input's frame count.

Why the start: diffusers' 1.5 text-to-video pipeline also puts its extra latent frame first and
drops the first latents before decoding, and its image-to-video pipeline pads the image latent by
repeating it in front; the first latent frame is the VAE's one-frame causal start, while every
later one stands for 4 video frames, so pairing [copy, first] keeps the later pairs aligned to
whole groups of 8 frames. Why a copy rather than noise: the step must be a function of the rows
alone (inversion, its resumption, the fixed-point check, the edit and the captured attention all
call it on the same latents and must agree), and a copy carries frame 0's noise level at every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def rotary_embeddings(
    transformer: torch.nn.Module | Mapping[str, Any], latent_shape: torch.Size, vae_scale_spatial: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE tables for latents of shape [B, F, C, h, w] (before `predict` pads them), as
    diffusers' CogVideoX pipeline builds them: 1.0 stretches its grid over the trained size's
    ("linspace"), 1.5 takes the top-left corner of its largest grid ("slice") and counts time in
    tokens of patch_size_t frames.

    `transformer` is the model or its config: the tables depend on the config alone."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = transformer.config if isinstance(transformer, torch.nn.Module) else transformer
    _, frames, _, h, w = latent_shape
    patch, patch_t = cfg["patch_size"], cfg.get("patch_size_t") or 1
    grid_h, grid_w = h // patch, w // patch
    base_h, base_w = cfg["sample_height"] // patch, cfg["sample_width"] // patch
    # On the latents' device: with offloading the weights may sit on the CPU or the meta device.
    common = dict(embed_dim=cfg["attention_head_dim"], grid_size=(grid_h, grid_w), device=device)
    if patch_t == 1:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(crops_coords=crops, temporal_size=frames, **common)
    return get_3d_rotary_pos_embed(crops_coords=None, temporal_size=-(-frames // patch_t), grid_type="slice", max_size=(base_h, base_w), **common)


def padding_frames(frames: int, patch_t: int) -> int:
    """How many latent frames `predict` puts in front of `frames` for a model patching time by `patch_t`."""
    return -frames % patch_t


def pad_frames(rows: torch.Tensor, patch_t: int) -> torch.Tensor:
    """rows [B, F, C, h, w] with copies of frame 0 in front, up to a multiple of `patch_t` frames."""
    pad = padding_frames(rows.shape[1], patch_t)
    return torch.cat([rows[:, :1].expand(-1, pad, -1, -1, -1), rows], dim=1) if pad else rows


def predict(
    transformer: torch.nn.Module,
    rows: torch.Tensor,
    embeds: torch.Tensor,
    t: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The model's v-prediction for every row, in float32 (the scheduler's arithmetic precision).
    For CogVideoX1.5 the rows are padded in front for the call and the padding's predictions dropped."""
    timestep = t.expand(rows.shape[0]).to(rows.device)
    patch_t = transformer.config.get("patch_size_t") or 1
    pad = padding_frames(rows.shape[1], patch_t)
    out = transformer(
        hidden_states=pad_frames(rows, patch_t),
        encoder_hidden_states=embeds,
        timestep=timestep,
        image_rotary_emb=rotary,
        return_dict=False,
    )[0]
    return out[:, pad:].float()


def guided(v: torch.Tensor, guidance: float, cfg: bool) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) over rows laid out [uncond..., cond...]."""
    if not cfg:
        return v
    uncond, cond = v.chunk(2)
    return uncond + guidance * (cond - uncond)
