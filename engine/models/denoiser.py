"""One call of the CogVideoX transformer on a batch of latent rows, shared by inversion and edit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def rotary_embeddings(
    transformer: torch.nn.Module | Mapping[str, Any], latent_shape: torch.Size, vae_scale_spatial: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE tables for latents of shape [B, F, C, h, w], as the 5B pipeline builds them.

    `transformer` is the model or its config: the tables depend on the config alone."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = transformer.config if isinstance(transformer, torch.nn.Module) else transformer
    _, frames, _, h, w = latent_shape
    patch = cfg["patch_size"]
    grid_h, grid_w = h // patch, w // patch
    crops = get_resize_crop_region_for_grid((grid_h, grid_w), cfg["sample_width"] // patch, cfg["sample_height"] // patch)
    # On the latents' device: with offloading the weights may sit on the CPU or the meta device.
    return get_3d_rotary_pos_embed(
        embed_dim=cfg["attention_head_dim"],
        crops_coords=crops,
        grid_size=(grid_h, grid_w),
        temporal_size=frames,
        device=device,
    )


def predict(
    transformer: torch.nn.Module,
    rows: torch.Tensor,
    embeds: torch.Tensor,
    t: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The model's v-prediction for every row, in float32 (the scheduler's arithmetic precision)."""
    timestep = t.expand(rows.shape[0]).to(rows.device)
    out = transformer(
        hidden_states=rows,
        encoder_hidden_states=embeds,
        timestep=timestep,
        image_rotary_emb=rotary,
        return_dict=False,
    )[0]
    return out.float()


def guided(v: torch.Tensor, guidance: float, cfg: bool) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) over rows laid out [uncond..., cond...]."""
    if not cfg:
        return v
    uncond, cond = v.chunk(2)
    return uncond + guidance * (cond - uncond)
