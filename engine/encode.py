"""Frames -> VAE latents (the encoder half of the VAE runs)."""

from __future__ import annotations

import torch


@torch.no_grad()
def encode_frames(vae: torch.nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """[F, 3, H, W] in [-1, 1] -> latents [1, F', C, h, w] times the VAE's scaling factor.

    The latent distribution's mode, not a sample: the same video always gives the same latents.
    """
    x = frames.to(device=vae.device, dtype=vae.dtype).unsqueeze(0).permute(0, 2, 1, 3, 4)
    latents = vae.encode(x).latent_dist.mode()
    return (latents * vae.config.scaling_factor).permute(0, 2, 1, 3, 4).contiguous()
