"""Latents -> frames (the decoder half of the VAE) -> mp4 files."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import numpy as np
import torch

from engine.errors import OutputExistsError

_MAX_NAME = 60


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> np.ndarray:
    """[K, F', C, h, w] -> uint8 frames [K, F, H, W, 3]."""
    from diffusers.video_processor import VideoProcessor

    z = latents.to(device=vae.device, dtype=vae.dtype).permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
    video = vae.decode(z).sample
    frames = VideoProcessor().postprocess_video(video.float(), output_type="np")  # [K, F, H, W, 3] in [0, 1]
    return (np.asarray(frames) * 255).round().astype(np.uint8)


def safe_name(prompt: str, index: int) -> str:
    """A file name from a prompt: ASCII words, bounded, never a path."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:_MAX_NAME].strip("-")
    return f"{index:02d}-{text or 'edit'}"


def claim(path: Path, force: bool) -> Path:
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to overwrite it or --out to write elsewhere")
    return path


def write_video(frames: np.ndarray, path: Path, fps: float) -> Path:
    """Write uint8 frames [F, H, W, 3] as an mp4 through diffusers' exporter (imageio-ffmpeg)."""
    from diffusers.utils import export_to_video

    tmp = path.with_name(f".{path.stem}.part{path.suffix}")
    export_to_video([f.astype(np.float32) / 255.0 for f in frames], str(tmp), fps=fps)
    tmp.replace(path)  # a half-written mp4 never carries the final name
    return path


def side_by_side(source: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """Source | edit, frame by frame (source cut to the edit's length and size)."""
    n = min(len(source), len(edited))
    src = torch.from_numpy(source[:n]).permute(0, 3, 1, 2).float()
    if src.shape[-2:] != edited.shape[1:3]:
        src = torch.nn.functional.interpolate(src, size=edited.shape[1:3], mode="bilinear", antialias=True)
    src = src.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return np.concatenate([src, edited[:n]], axis=2)
