"""Frames -> VAE latents (the encoder half of the VAE runs)."""

from __future__ import annotations

import os

import torch

from cache.faults import maybe_die
from engine.models.components import loaded
from engine.stages.context import StageContext
from engine.video.reader import FrameSettings, read_frames, to_model_input


@torch.no_grad()
def encode_frames(vae: torch.nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """[F, 3, H, W] (or a batch [N, F, 3, H, W]) in [-1, 1] -> latents [1 or N, F', C, h, w] times
    the VAE's scaling factor.

    The latent distribution's mode, not a sample: the same video always gives the same latents.
    """
    x = frames.to(device=vae.device, dtype=vae.dtype)
    x = (x.unsqueeze(0) if x.dim() == 4 else x).permute(0, 2, 1, 3, 4)
    latents = vae.encode(x).latent_dist.mode()
    return (latents * vae.config.scaling_factor).permute(0, 2, 1, 3, 4).contiguous()


def encode_stage(ctx: StageContext, frames: FrameSettings, video: str | os.PathLike, anchors: list[int] = ()) -> torch.Tensor:
    """The selected frames' latents, cached in `ctx.entry` with the frames themselves; followed by
    the latent of each of the frames `anchors` encoded alone (a long clip's windows' anchors,
    `engine.stages.windows.window_calls`)."""
    entry = ctx.entry
    with ctx.reporter.phase("encode") as ph:
        if entry.encoded:
            ph.hit(True, "latents cached")
            return entry.load(entry.paths.latents, "latents")
        ph.hit(False)
        pixels, _ = read_frames(video, frames)
        entry.save(entry.paths.frames, {"frames": pixels})
        with loaded("vae", ctx.info, ctx.runtime) as vae:
            latents = encode_frames(vae, to_model_input(pixels)).cpu()
            if anchors:  # a batch of one-frame clips: each is encoded as a clip's first frame
                alone = encode_frames(vae, to_model_input(pixels[list(anchors)]).unsqueeze(1)).cpu()
                latents = torch.cat([latents, alone.transpose(0, 1)], dim=1)
        maybe_die("encode")
        entry.save(entry.paths.latents, {"latents": latents})
        entry.mark_encoded(int(pixels.shape[0]), list(latents.shape))
        ph.record.detail = f"{pixels.shape[0]} frames -> latents {tuple(latents.shape[1:])}" + (f" ({len(anchors)} anchors)" if anchors else "")
        return latents
