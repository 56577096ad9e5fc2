"""DDIM inversion: clean video latents -> noise, keeping the latent after every step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.denoiser import guided, predict, rotary_embeddings


def inverse_scheduler(scheduler_config: dict[str, Any], steps: int):
    from diffusers import DDIMInverseScheduler

    # The inverse scheduler reads the edit scheduler's config, so both walk the same noise levels.
    scheduler = DDIMInverseScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def ddim_invert(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    cond: torch.Tensor,
    scheduler_config: dict[str, Any],
    steps: int,
    *,
    vae_scale_spatial: int,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    start: int = 0,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """DDIM inversion (Song et al. 2021, eq. 12 run from t=0 up). Returns the final noise.

    `latents` is the clean latent, or with `start=k` the latent after step k-1 (resume).
    `uncond` set means classifier-free guidance with rows [uncond, cond]; the callback gets
    {"i", "t", "x"} after every step, x being the latent after step i.
    """
    scheduler = inverse_scheduler(scheduler_config, steps)
    rotary = rotary_embeddings(transformer, latents.shape, vae_scale_spatial, latents.device)
    cfg = uncond is not None
    embeds = torch.cat([uncond, cond]) if cfg else cond
    x = latents
    for i, t in enumerate(scheduler.timesteps):
        if i < start:
            continue
        rows = torch.cat([x, x]) if cfg else x
        v = guided(predict(transformer, rows, embeds, t, rotary), guidance, cfg)
        # The model's dtype between steps, as upstream: what is cached is exactly what resumes.
        x = scheduler.step(v, t, x, return_dict=False)[0].to(latents.dtype)
        if callback is not None:
            callback({"i": i, "t": t, "x": x})
    return x
