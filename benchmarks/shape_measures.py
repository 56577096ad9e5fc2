"""Exact measures of edits in the shapes world (engine/video/shapes.py), where the source's every
pixel is known: its objects' masks, colors, shapes and paths.

Frames are uint8 [F, H, W, 3] numpy arrays or tensors. A pixel is read as the nearest color of
the world's palette (the five object colors and the four backgrounds), so "the object" in an
edited frame is the pixels nearest an object color. For an edit of one attribute of the first
object:

- color: share of the object's pixels (the source's mask) nearest the target color, and nearest
  the source's color (an edit that kept it);
- shape: IoU of the object's pixels with the target shape drawn at the source's centroids and size;
- background: share of the pixels outside every object nearest the target background, and their mean color;
- structure kept: the object's centroid track against the source's (px), its size against the source's;
- what should not change: PSNR outside the object's mask against the source's reconstruction;
- a local color edit that paints more than the object: the target-colored area over the whole
  frame against the object's, and that region's centroid against the object's.

Each measure can fail: tests/test_shapes.py shows an unedited source, a wrong color or a
moved object scoring badly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.stages.verify import psnr_db
from engine.video.shapes import BACKGROUNDS, COLORS, SHAPES, ClipSpec, shape_area, shape_mask

PALETTE_NAMES = (*COLORS, *BACKGROUNDS)
PALETTE = np.array([*COLORS.values(), *BACKGROUNDS.values()], dtype=np.float32)
MIN_PIXELS = 20  # fewer object pixels than this in a frame: no object there (a blur, a speck)
EDGE = 2  # px: VAE-blurred rim around each object left out of color and PSNR measures


def _array(frames) -> np.ndarray:
    return np.asarray(frames, dtype=np.float32)


def nearest(frames) -> np.ndarray:
    """int [F, H, W]: index into PALETTE_NAMES of each pixel's nearest palette color."""
    x = _array(frames)
    d = ((x[..., None, :] - PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def color_index(name: str) -> int:
    return PALETTE_NAMES.index(name)


def object_pixels(labels: np.ndarray) -> np.ndarray:
    """bool [...]: pixels nearest one of the object colors."""
    return labels < len(COLORS)


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """Binary dilation of [..., H, W] by a (2px+1)^2 square (by shifting: no scipy needed here)."""
    out = mask.copy()
    for axis in (-2, -1):
        grown = out.copy()
        for s in range(1, px + 1):
            grown |= _shift(out, s, axis) | _shift(out, -s, axis)
        out = grown
    return out


def erode(mask: np.ndarray, px: int) -> np.ndarray:
    return ~dilate(~mask, px)


def _shift(mask: np.ndarray, s: int, axis: int) -> np.ndarray:
    out = np.zeros_like(mask)
    n = mask.shape[axis]
    src = [slice(None)] * mask.ndim
    dst = [slice(None)] * mask.ndim
    src[axis], dst[axis] = (slice(0, n - s), slice(s, n)) if s > 0 else (slice(-s, n), slice(0, n + s))
    out[tuple(dst)] = mask[tuple(src)]
    return out


def centroid(mask: np.ndarray) -> np.ndarray | None:
    """(x, y) of a [H, W] mask's pixel centers, None if it has fewer than MIN_PIXELS."""
    ys, xs = np.nonzero(mask)
    if len(xs) < MIN_PIXELS:
        return None
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def classify_shape(mask: np.ndarray) -> tuple[str | None, dict[str, float]]:
    """The shape a [H, W] blob looks like: each shape drawn at the blob's centroid with the blob's
    area, the best IoU wins. (None, {}) when there is no blob."""
    c = centroid(mask)
    if c is None:
        return None, {}
    area = float(mask.sum())
    scores = {s: iou(mask, shape_mask(s, c[None], float(np.sqrt(area / shape_area(s, 1.0))), *mask.shape)[0]) for s in SHAPES}
    return max(scores, key=scores.get), scores


# ---------------------------------------------------------------- samples from noise


def sample_adherence(frames, color: str, shape: str) -> dict[str, float]:
    """How well a sample drawn from noise under a one-object caption follows it, per frame: the
    object's pixels (nearest any object color), the share of them nearest `color`, and whether the
    pixels nearest `color` look like `shape`. A frame is right when over half its object pixels
    have the caption's color, and right in shape when that blob classifies as `shape`."""
    labels = nearest(frames)
    objects = object_pixels(labels)
    target = labels == color_index(color)
    color_ok, shape_ok, shares = [], [], []
    for f in range(len(labels)):
        n = int(objects[f].sum())
        share = float(target[f].sum() / n) if n >= MIN_PIXELS else 0.0
        shares.append(share)
        color_ok.append(share > 0.5)
        shape_ok.append(classify_shape(target[f])[0] == shape)
    return {"color_share": float(np.mean(shares)), "color_frames": float(np.mean(color_ok)), "shape_frames": float(np.mean(shape_ok))}


# ---------------------------------------------------------------- edits


@dataclass(frozen=True)
class EditTruth:
    """What an edit of `source` should give: the spec after the change, and the source's masks."""

    source: ClipSpec
    target: ClipSpec
    masks: np.ndarray  # bool [objects, F, H, W] of the source

    @property
    def kind(self) -> str:
        a, b = self.source, self.target
        if a.background != b.background:
            return "background"
        (x, y) = a.things[0], b.things[0]
        return next(k for k in ("color", "shape", "direction") if getattr(x, k) != getattr(y, k))


def psnr_outside(frames, reference, mask: np.ndarray) -> float:
    """PSNR (dB, peak 255, engine.stages.verify's) over the pixels where `mask` [F, H, W] is False."""
    keep = ~mask
    return psnr_db(torch.from_numpy(_array(frames)[keep]), torch.from_numpy(_array(reference)[keep]))


def edit_measures(frames, truth: EditTruth, reconstruction=None) -> dict[str, float]:
    """Every measure of one edited video against what the edit asked for (module docstring);
    `reconstruction` (the source's own round trip, same settings) adds the PSNR outside the object."""
    labels = nearest(frames)
    thing, want = truth.source.things[0], truth.target.things[0]
    mask = truth.masks[0]
    every = truth.masks.any(0)
    frames_n = len(labels)
    out: dict[str, float] = {}
    # The object in the edit: pixels nearest an object color, near where the source's object was.
    near = dilate(mask, 6)
    found = object_pixels(labels) & near
    # color: inside the source's mask, away from its blurred rim
    core = erode(mask, EDGE)
    inside = labels[core]
    out["color_share"] = float((inside == color_index(want.color)).mean()) if inside.size else 0.0
    # the edit kept the source's color (not a failed measure): names why color_share stays low
    out["source_color_share"] = float((inside == color_index(thing.color)).mean()) if inside.size else 0.0
    # shape: the object's pixels against the target shape drawn on the source's path
    track = thing.centroids(frames_n)  # the source's path
    drawn = shape_mask(want.shape, track, thing.size)
    out["shape_iou"] = float(np.mean([iou(found[f], drawn[f]) for f in range(frames_n)]))
    # background: outside every object (and its rim)
    rim = dilate(every, EDGE)
    outside = ~rim
    bg = labels[outside]
    out["background_share"] = float((bg == color_index(truth.target.background)).mean())
    out["background_rgb"] = [round(float(v), 1) for v in _array(frames)[outside].mean(0)]
    # structure: centroid track and size against the source's
    errors, sizes = [], []
    for f in range(frames_n):
        c = centroid(found[f])
        errors.append(np.inf if c is None else float(np.linalg.norm(c - track[f])))
        sizes.append(found[f].sum() / max(mask[f].sum(), 1))
    out["centroid_error_px"] = float(np.mean(errors))
    out["size_ratio"] = float(np.mean(sizes))
    if reconstruction is not None:
        out["psnr_outside_db"] = psnr_outside(frames, reconstruction, rim)
    return out


def painted_region(frames, truth: EditTruth) -> dict[str, float]:
    """Where a color edit put the target color, over the whole frame: its area over the object's (all
    frames together; a box painted whole scores the box's area) and the distance of its centroid from
    the object's, mean over frames (inf when a frame has no such region)."""
    target = nearest(frames) == color_index(truth.target.things[0].color)
    mask = truth.masks[0]
    errors = []
    for f in range(len(target)):
        c, o = centroid(target[f]), centroid(mask[f])
        errors.append(np.inf if c is None or o is None else float(np.linalg.norm(c - o)))
    return {"area_ratio": float(target.sum() / max(mask.sum(), 1)), "centroid_px": float(np.mean(errors))}
