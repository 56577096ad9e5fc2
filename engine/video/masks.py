"""Masks for local edits: where an edit may change the video (white) and where it must keep the
source (black), on the model's latent grid.

A mask comes as an image (one mask for every frame), a video (one mask per frame), a box in
fractions of the frame (X0, Y0, X1, Y1) or two (`Boxes`: the box on the first frame and on the
last, moving linearly between them, for an object that moves), or, from Python, an array [H, W] or
[F, H, W] of values in 0-1 at the edit's frame size. `fit_to_object` shrinks a mask to what stands
apart inside it (the object a box was drawn around), so a local edit does not paint the whole box;
`pasted` puts the decoded edit into the source through the pixel mask, frame by frame (outside it
the output is the source exactly). Files meet the frame size the way the source video did (the
inversion's --fit), and a mask video with as many frames as the source video goes through the
same frame selection. `latent_mask` brings a pixel mask to the latent grid: each latent frame
takes the union of the frames it encodes (nothing that should change is kept), each latent cell
the share of its pixels that may change, and a one-cell soft edge outside (so the seam does not
show as a step).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
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
FITS = ("none", "object")  # --mask-fit
# fit_to_object: a pixel farther than this (RGB, 0-255) from every color of the surroundings is the
# object's; a color is the surroundings' when at least EDGE_SHARE of the mask's edge has it (so an
# object that pokes through the edge stays the object); the fit then grows by FIT_MARGIN px, since
# the VAE blurs an object's rim into what surrounds it.
FIT_DISTANCE = 40.0
EDGE_SHARE = 0.25
EDGE_SAMPLES = 64
FIT_MARGIN = 2


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


Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Boxes:
    """A box that moves: `start` on the first frame, `end` on the last, linear in between."""

    start: Box
    end: Box


def parse_box(text: str | tuple | list, flag: str = "--mask-box") -> Box:
    """'0.1,0.2,0.6,0.9' or a 4-tuple -> (x0, y0, x1, y1), checked to be a non-empty box in 0..1;
    `flag` names the setting in the errors."""
    try:
        values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        values = []
    if len(values) != 4:
        raise SettingsError(f"{flag} takes four fractions of the frame X0,Y0,X1,Y1 like 0.25,0.2,0.75,0.8, got {text!r}")
    x0, y0, x1, y1 = values
    if not all(0.0 <= v <= 1.0 for v in values):
        raise SettingsError(f"{flag} {text!r} reaches outside the frame: each of X0,Y0,X1,Y1 is a fraction between 0 and 1")
    if not (x0 < x1 and y0 < y1):
        raise SettingsError(f"{flag} {text!r} is empty: it needs X0 < X1 and Y0 < Y1")
    return x0, y0, x1, y1


def box_text(x0: float, y0: float, x1: float, y1: float) -> str:
    """A box as `--mask-box` takes it, rounded outwards to hundredths of the frame (clipped to 0-1):
    what a box drawn around something says, with that thing still inside."""
    lo = [max(0.0, math.floor(v * 100 + 1e-6) / 100) for v in (x0, y0)]
    hi = [min(1.0, math.ceil(v * 100 - 1e-6) / 100) for v in (x1, y1)]
    return f"{lo[0]:g},{lo[1]:g},{hi[0]:g},{hi[1]:g}"


def _box_pixels(box: Box, height: int, width: int) -> torch.Tensor:
    """bool [H, W]: the pixels whose centers lie inside the box."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(height) + 0.5) / height
    xs = (torch.arange(width) + 0.5) / width
    return ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]


def _numbers(box: Box) -> str:
    return ",".join(f"{v:g}" for v in box)


def box_mask(box: Box | Boxes, frames: int, height: int, width: int, shown: int | None = None) -> Mask:
    """The box as a pixel mask: a pixel may change when its center lies inside the box. `Boxes`
    move over the `shown` frames (the rest repeat the last frame, as the clip's padding does)."""
    if isinstance(box, tuple):
        return Mask(_box_pixels(box, height, width).float().expand(frames, -1, -1).clone(), f"box {_numbers(box)}")
    last = max((shown or frames) - 1, 1)
    start, end = torch.tensor(box.start, dtype=torch.float64), torch.tensor(box.end, dtype=torch.float64)
    steps = [torch.lerp(start, end, min(f / last, 1.0)).tolist() for f in range(frames)]
    pixels = torch.stack([_box_pixels(tuple(b), height, width) for b in steps]).float()
    return Mask(pixels, f"box {_numbers(box.start)} to {_numbers(box.end)}")


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


def mask_spec(mask: Any, box: str | tuple | list | None, box_end: str | tuple | list | None = None, fit: str = "none", paste: bool = False) -> Any:
    """The mask `--mask`/`--mask-box`/`--mask-box-end` name (a checked box or `Boxes`, a file path or
    an array), or None: what can be checked before the edit's frames are known, so `run` refuses it
    before inverting. `fit` (`--mask-fit`) and `paste` (`--mask-paste`) are checked here too."""
    if paste and mask is None and box is None:
        raise SettingsError("--mask-paste puts the edit into the source through the mask: give --mask-box (or --mask) too")
    if fit not in FITS:
        raise SettingsError(f"--mask-fit {fit!r}: choose {' or '.join(FITS)}")
    if mask is not None and box is not None:
        raise SettingsError("give --mask or --mask-box, not both")
    if box_end is not None and box is None:
        raise SettingsError("--mask-box-end is the box on the last frame: give the first frame's box with --mask-box too")
    if fit != "none" and mask is None and box is None:
        raise SettingsError(f"--mask-fit {fit} shrinks a mask to the object inside it: give --mask-box (or --mask) too")
    if box_end is not None:
        return Boxes(parse_box(box), parse_box(box_end, "--mask-box-end"))
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
    if isinstance(mask, Boxes):
        return box_mask(mask, frames, *size, shown)
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


def _grow(pixels: torch.Tensor, px: int) -> torch.Tensor:
    """Binary dilation of bool [F, H, W] by a (2px+1)^2 square."""
    return torch.nn.functional.max_pool2d(pixels.float()[:, None], 2 * px + 1, 1, px)[:, 0] > 0


def _surroundings(colors: torch.Tensor) -> torch.Tensor:
    """The colors of a mask's edge [N, 3] that at least EDGE_SHARE of the edge shares (within
    FIT_DISTANCE); on an edge with no color that common, the most common ones."""
    picked = colors[torch.linspace(0, len(colors) - 1, min(len(colors), EDGE_SAMPLES)).long()]
    share = (torch.cdist(picked, picked) <= FIT_DISTANCE).float().mean(1)
    return picked[share >= min(EDGE_SHARE, share.max())]


def fit_to_object(mask: Mask, frames: torch.Tensor) -> Mask:
    """`--mask-fit object`: the mask shrunk, frame by frame, to what stands apart inside it: the
    pixels whose color is far from every common color on the mask's edge (a box drawn around an
    object has the object's surroundings on its edge), grown by FIT_MARGIN and kept inside the mask.
    `frames`: the source, uint8 [F, H, W, 3] at the mask's frames and size.
    Written here: no installed library segments an object from a box (OpenCV's GrabCut or a SAM
    model would, for a large dependency or model weights), and the edge's colors are enough for
    an object that differs in color from what is around it."""
    region = mask.pixels >= 0.5
    # the mask's edge: its pixels next to the outside (the frame's border counts as outside)
    outside = torch.nn.functional.pad((~region).float()[:, None], (1, 1, 1, 1), value=1.0)
    edge = region & (torch.nn.functional.max_pool2d(outside, 3, 1)[:, 0] > 0)
    rgb = frames.float()
    fitted = torch.zeros_like(region)
    for f in range(len(region)):
        if edge[f].any():  # else the mask is empty on this frame
            surroundings = _surroundings(rgb[f][edge[f]])
            fitted[f][region[f]] = torch.cdist(rgb[f][region[f]], surroundings).amin(1) > FIT_DISTANCE
    if not fitted.any():
        raise SettingsError(f"--mask-fit object found nothing inside the mask ({mask.label}) that stands apart from its edge: "
                            "draw the box around the object with some of its surroundings, or leave --mask-fit off")
    return Mask(mask.pixels * _grow(fitted, FIT_MARGIN).float(), f"{mask.label}, fit to the object")


def pasted(edited: np.ndarray, source: np.ndarray, mask: Mask) -> np.ndarray:
    """`--mask-paste`: uint8 frames [F, H, W, 3], the edit where the mask is white and the source
    where it is black, frame by frame. The latent mask follows the pixel mask only per 4 frames and
    per 8-px cell (a moving object's edit trails it); this follows it per frame and pixel. Its
    edge is softened by one pixel (a 3x3 box blur) so the join does not show as a step."""
    n = len(edited)
    weight = torch.nn.functional.avg_pool2d(mask.pixels[:n, None].float(), 3, 1, 1, count_include_pad=False)[:, 0, ..., None].numpy()
    mixed = weight * edited.astype(np.float32) + (1 - weight) * source[:n].astype(np.float32)
    return mixed.round().clip(0, 255).astype(np.uint8)


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
