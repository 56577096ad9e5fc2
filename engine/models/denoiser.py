"""One call of the CogVideoX transformer on a batch of latent rows, shared by inversion and edit."""

from __future__ import annotations

import contextlib
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


# torch's SDPA tries FlashAttention-2 first. On Hopper (compute capability 9.x) cuDNN's fused
# attention computes the same softmax faster (benchmarks/results/E2E.md, variant `flash`); on
# Ampere, Ada and Blackwell it does not pay, so torch's own order stays there.
CUDNN_FIRST = (9,)


def attention_order(device: torch.device) -> contextlib.AbstractContextManager:
    """torch's SDPA backends tried cuDNN first where `CUDNN_FIRST` names the GPU's major
    compute capability; a shape cuDNN can't serve falls back in torch's usual order."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] not in CUDNN_FIRST:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def predict(
    transformer: torch.nn.Module,
    rows: torch.Tensor,
    embeds: torch.Tensor,
    t: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The model's v-prediction for every row, in float32 (the scheduler's arithmetic precision)."""
    timestep = t.expand(rows.shape[0]).to(rows.device)
    with attention_order(rows.device):
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
