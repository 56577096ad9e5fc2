"""Masks for local edits: where an edit may change the video (white) and where it must keep the
source (black), on the model's latent grid.

A mask comes as an image (one mask for every frame), a video (one mask per frame), a box in
fractions of the frame (X0, Y0, X1, Y1), or, from Python, an array [H, W] or [F, H, W] of values in
0-1 at the edit's frame size. Files meet the frame size the way the source video did (the
inversion's --fit), and a mask video with as many frames as the source video goes through the
same frame selection. `latent_mask` brings a pixel mask to the latent grid: each latent frame
takes the union of the frames it encodes (nothing that should change is kept), each latent cell
the share of its pixels that may change, and a one-cell soft edge outside (so the seam does not
show as a step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import SettingsError
from engine.video.reader import FrameSettings, decode_size, fit_frames, probe_video, read_frames

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SOFT_EDGE = torch.tensor([1.0, 2.0, 1.0]) / 4  # separable 3x3 blur: a one-cell ramp


@dataclass(frozen=True)
class Mask:
    """A pixel mask [F, H, W] in 0-1 and a short description of where it came from."""

    pixels: torch.Tensor
    label: str

    @property
    def digest(self) -> str:
        """What the edit's settings record: a hash of the values (a file may change under its
        name; a box and the same mask drawn by hand are the same edit)."""
        values = (self.pixels * 255).round().to(torch.uint8).contiguous().numpy().tobytes()
        return f"sha256:{hashlib.sha256(values).hexdigest()[:16]}"


def parse_box(text: str | tuple | list) -> tuple[float, float, float, float]:
    """'0.1,0.2,0.6,0.9' or a 4-tuple -> (x0, y0, x1, y1), checked to be a non-empty box in 0..1."""
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        values = []
    if len(values) != 4:
        raise SettingsError(f"--mask-box takes four fractions of the frame X0,Y0,X1,Y1 like 0.25,0.2,0.75,0.8, got {text!r}")
    x0, y0, x1, y1 = values
    if not all(0.0 <= v <= 1.0 for v in values):
        raise SettingsError(f"--mask-box {text!r} reaches outside the frame: each of X0,Y0,X1,Y1 is a fraction between 0 and 1")
    if not (x0 < x1 and y0 < y1):
        raise SettingsError(f"--mask-box {text!r} is empty: it needs X0 < X1 and Y0 < Y1")
    return x0, y0, x1, y1


def box_mask(box: tuple[float, float, float, float], frames: int, height: int, width: int) -> Mask:
    """The box as a pixel mask: a pixel may change when its center lies inside the box."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(height) + 0.5) / height
    xs = (torch.arange(width) + 0.5) / width
    inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    return Mask(inside.float().expand(frames, -1, -1).clone(), f"box {x0:g},{y0:g},{x1:g},{y1:g}")


def _gray(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [F, H, W] in 0-1 (white = 1)."""
    return torch.from_numpy(frames).float().mean(-1) / 255


def _image(path: Path, settings: FrameSettings) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise SettingsError(f"--mask {path} is not a readable image ({exc}); save it as a PNG, white where the edit may change") from None
    h, w = decode_size(rgb.width, rgb.height, settings)
    resized = np.array(rgb.resize((w, h), Image.BILINEAR))[None]
    return _gray(fit_frames(resized, settings))[0]


def _video(path: Path, settings: FrameSettings, source_frames: int, frames: int, shown: int) -> torch.Tensor:
    count = probe_video(path).num_frames
    if count == source_frames:  # a mask per source frame: the source's frame selection applies
        chosen = settings
    elif count in (frames, shown):  # a mask per edited frame (padded below like the frames)
        chosen = dataclasses.replace(settings, max_frames=None if count == shown < frames else frames, skip_start=0, skip_end=0, stride=None, fps=None)
    else:
        raise SettingsError(
            f"--mask {path} has {count} frames; give one mask per frame of the source video ({source_frames}) "
            f"or of the edit ({frames}), or an image for all frames"
        )
    pixels, _ = read_frames(path, chosen)
    return _gray(pixels.numpy())


def mask_spec(mask: Any, box: str | tuple | list | None) -> Any:
    """The mask `--mask`/`--mask-box` name (a checked box, a file path or an array), or None:
    what can be checked before the edit's frames are known, so `run` refuses it before inverting."""
    if mask is not None and box is not None:
        raise SettingsError("give --mask or --mask-box, not both")
    if box is not None:
        return parse_box(box)
    if isinstance(mask, str | os.PathLike) and not Path(mask).is_file():
        raise SettingsError(f"--mask {mask} does not exist: give an image or a video, white where the edit may change")
    return mask


def load_mask(mask: Any, settings: FrameSettings, source_frames: int, frames: int, shown: int | None = None) -> Mask:
    """The mask of an edit of `frames` frames at settings' size, from a file path, a box (4-tuple)
    or an array (module docstring); `source_frames` is the source video's frame count; `shown`
    the edit's frames without the repeats that padded them to 4k+1 (a mask of that many is padded alike)."""
    shown = shown or frames
    size = (settings.height, settings.width)
    if isinstance(mask, tuple | list) and len(mask) == 4 and all(isinstance(v, int | float) for v in mask):
        return box_mask(parse_box(mask), frames, *size)
    if isinstance(mask, str | os.PathLike):
        path = Path(mask_spec(mask, None))
        if path.suffix.lower() in IMAGE_SUFFIXES:
            pixels = _image(path, settings).expand(frames, -1, -1).clone()
        else:
            pixels = _video(path, settings, source_frames, frames, shown)
        return _checked(pixels, f"file {path.name}")
    pixels = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    if pixels.ndim == 2:
        pixels = pixels.expand(frames, -1, -1).clone()
    elif pixels.ndim == 3 and len(pixels) == shown < frames:  # the last frame's mask for the repeats
        pixels = torch.cat([pixels, pixels[-1:].expand(frames - shown, -1, -1)])
    if pixels.ndim != 3 or tuple(pixels.shape[1:]) != size or len(pixels) != frames:
        raise SettingsError(f"mask array is shaped {list(pixels.shape)}; give [{size[0]}, {size[1]}] or [{frames}, {size[0]}, {size[1]}] (the edit's frames, height, width)")
    if pixels.min() < 0 or pixels.max() > 1:
        raise SettingsError("mask array values must lie in 0-1 (1 = may change)")
    return _checked(pixels, "array")


def _checked(pixels: torch.Tensor, label: str) -> Mask:
    if pixels.max() < 0.5:
        raise SettingsError(f"the mask ({label}) is black everywhere: nothing could change; paint white where the edit may change")
    return Mask(pixels, label)


def latent_mask(mask: Mask, latent_frames: int, height: int, width: int) -> torch.Tensor:
    """[latent_frames, 1, height, width] in 0-1: the mask on the latent grid (module docstring).
    Latent frame 0 encodes frame 0, latent frame k frames 4k-3..4k (CogVideoX's 4x causal VAE)."""
    pixels = mask.pixels
    groups = [pixels[:1]] + [pixels[4 * k - 3 : 4 * k + 1] for k in range(1, latent_frames)]
    if len(pixels) != 4 * (latent_frames - 1) + 1:
        raise SettingsError(f"the mask has {len(pixels)} frames, the edit {4 * (latent_frames - 1) + 1}")
    union = torch.stack([g.amax(0) for g in groups])[:, None]
    cells = torch.nn.functional.adaptive_avg_pool2d(union, (height, width))
    k = SOFT_EDGE
    blurred = torch.nn.functional.conv2d(torch.nn.functional.pad(cells, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None, :])[None, None])
    return torch.maximum(cells, blurred).clamp(0, 1)
