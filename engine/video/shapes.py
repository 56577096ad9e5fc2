"""The shapes world: synthetic clips whose every pixel's truth is known, for judging edits.

A clip is 17 frames of 96x144 (the proxy's size): one object, sometimes two, each a circle,
square or triangle in one of five colors, moving in a straight line at a constant 1-3 px per
frame (left, right, up or down) over a lightly textured background. `render` returns the frames
and each object's exact per-frame mask; `caption` says what is in the clip in one fixed grammar:

    a {color} {shape} moving {direction} on a {background} background
    a {color} {shape} moving {direction} and a {color} {shape} moving {direction} on a {background} background

Some color x shape combinations (`HELD_OUT`) never appear in training clips (`split="train"`);
every held-out clip's first object is one of them, so what is measured on them is
generalisation, not memory. Everything is seeded: `clip_spec(seed, split)` is the same clip on
every machine.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

FRAMES, HEIGHT, WIDTH = 17, 96, 144

SHAPES = ("circle", "square", "triangle")
COLORS = {  # RGB, far apart so "nearest color" is unambiguous
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 70, 225),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
}
BACKGROUNDS = {
    "gray": (120, 120, 120),
    "sand": (200, 180, 130),
    "grass": (70, 120, 50),
    "sky": (120, 170, 230),
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) in image axes

# Never in a training clip; the first object of every held-out clip.
HELD_OUT = (("yellow", "triangle"), ("blue", "circle"), ("white", "square"))

SIZES = (11, 15)  # half-extent s in px: a circle of radius s, a square of side 2s, a triangle of base and height 2s
SPEEDS = (1, 2, 3)  # px per frame
TWO_OBJECTS = 0.3  # share of clips with a second object
TEXTURE = 8.0  # std of the background's texture, per channel, in 0-255 units
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Thing:
    """One moving object. (x, y) is its centroid in px at frame 0."""

    shape: str
    color: str
    direction: str
    speed: int
    size: float
    x: float
    y: float

    def centroids(self, frames: int = FRAMES) -> np.ndarray:
        """[frames, 2] (x, y) of the centroid at every frame."""
        dx, dy = DIRECTIONS[self.direction]
        t = np.arange(frames, dtype=np.float64) * self.speed
        return np.stack([self.x + dx * t, self.y + dy * t], axis=1)

    def words(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"


@dataclass(frozen=True)
class ClipSpec:
    """What a clip shows; `seed` also draws the background's texture."""

    things: tuple[Thing, ...]
    background: str
    seed: int

    @property
    def caption(self) -> str:
        """The clip's caption, in the one grammar the proxy was trained on."""
        return f"{' and '.join(t.words() for t in self.things)} on a {self.background} background"


def vocabulary() -> list[str]:
    """Sentences that use every word of the grammar (the proxy's tokenizer learns them as words)."""
    return [
        f"a {c} {s} moving {d} and a {c} {s} moving {d} on a {b} background"
        for c, s, d, b in zip(COLORS, SHAPES * 2, list(DIRECTIONS) * 2, list(BACKGROUNDS) * 2, strict=False)
    ]


def shape_mask(shape: str, centroids: np.ndarray, size: float, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """bool [len(centroids), height, width]: `shape` of half-extent `size` with its centroid at each
    (x, y), sampled at pixel centers. The triangle points up; its centroid sits a third of its
    height above the base, so every shape drawn at the same centroids covers the same place."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    dx = xs[None] - centroids[:, 0, None, None].astype(np.float32)
    dy = ys[None] - centroids[:, 1, None, None].astype(np.float32)
    if shape == "circle":
        return dx**2 + dy**2 <= size**2
    if shape == "square":
        return (np.abs(dx) <= size) & (np.abs(dy) <= size)
    if shape == "triangle":
        # apex at dy = -4s/3, base at dy = +2s/3, half-width grows from 0 to s over the height 2s
        top, base = -4 * size / 3, 2 * size / 3
        return (dy >= top) & (dy <= base) & (np.abs(dx) <= (dy - top) / 2)
    raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")


def shape_area(shape: str, size: float) -> float:
    """Area in px^2 of `shape` at half-extent `size`."""
    return {"circle": math.pi, "square": 4.0, "triangle": 2.0}[shape] * size**2


def _thing(rng: np.random.Generator, color: str, shape: str) -> Thing:
    """A thing whose whole path stays inside the frame."""
    direction = str(rng.choice(list(DIRECTIONS)))
    speed = int(rng.choice(SPEEDS))
    size = float(rng.uniform(*SIZES))
    dx, dy = DIRECTIONS[direction]
    travel = speed * (FRAMES - 1)
    # Room the centroid needs: the triangle reaches 4s/3 above its centroid, every shape s sideways.
    lo_x, hi_x = size + 1, WIDTH - size - 1
    lo_y, hi_y = 4 * size / 3 + 1, HEIGHT - size - 1
    lo_x, hi_x = lo_x + travel * max(-dx, 0), hi_x - travel * max(dx, 0)
    lo_y, hi_y = lo_y + travel * max(-dy, 0), hi_y - travel * max(dy, 0)
    return Thing(shape, color, direction, speed, size, float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y)))


def _pair(rng: np.random.Generator, split: str, first: bool) -> tuple[str, str]:
    """A color and shape: held-out pairs never in training; always the first object when held out."""
    if split == "heldout" and first:
        return HELD_OUT[int(rng.integers(len(HELD_OUT)))]
    while True:
        pair = (str(rng.choice(list(COLORS))), str(rng.choice(SHAPES)))
        if pair not in HELD_OUT:
            return pair


def clip_spec(seed: int, split: str = "train", objects: int | None = None) -> ClipSpec:
    """The clip of `seed` in `split` ("train" or "heldout"); `objects` forces 1 or 2 things."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # The split is part of the seed: a held-out clip is never a training clip with another label.
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    count = objects or (2 if rng.random() < TWO_OBJECTS else 1)
    things = tuple(_thing(rng, *_pair(rng, split, i == 0)) for i in range(count))
    return ClipSpec(things, str(rng.choice(list(BACKGROUNDS))), seed)


def one_object_seeds(count: int, split: str) -> list[int]:
    """The first `count` seeds of `split` whose clip has one object (a caption an edit or a sample can be judged by)."""
    return [s for s in range(10 * count) if len(clip_spec(s, split).things) == 1][:count]


def background(name: str, seed: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """float [height, width, 3]: the background color with a smooth, static, seeded texture
    (noise on a grid of 8 px cells, bilinearly upsampled), texture to keep, the color still clear."""
    rng = np.random.default_rng([seed, 7])
    coarse = torch.from_numpy(rng.normal(0.0, TEXTURE, (1, 3, height // 8 + 1, width // 8 + 1)))
    fine = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return np.asarray(BACKGROUNDS[name], dtype=np.float64) + fine[0].permute(1, 2, 0).numpy()


def render(spec: ClipSpec, frames: int = FRAMES) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames [frames, H, W, 3] and bool masks [objects, frames, H, W]; a later object is
    drawn over an earlier one, and an earlier object's mask keeps only its visible pixels."""
    still = np.clip(np.round(background(spec.background, spec.seed)), 0, 255).astype(np.uint8)
    video = np.repeat(still[None], frames, axis=0)
    masks = np.zeros((len(spec.things), frames, HEIGHT, WIDTH), dtype=bool)
    for k, thing in enumerate(spec.things):
        m = shape_mask(thing.shape, thing.centroids(frames), thing.size)
        video[m] = COLORS[thing.color]
        masks[:k] &= ~m
        masks[k] = m
    return video, masks


def around(spec: ClipSpec, margin: float, frames: int = FRAMES, box: bool = False) -> np.ndarray:
    """bool [frames, H, W]: every object drawn `margin` px larger, a mask "around the objects";
    with `box`, a square around each instead, large enough for any of the shapes at that place
    and size (the triangle reaches 4s/3 above its centroid): the mask a shape change needs."""
    out = np.zeros((frames, HEIGHT, WIDTH), dtype=bool)
    for thing in spec.things:
        if box:
            out |= shape_mask("square", thing.centroids(frames), 4 * thing.size / 3 + margin)
        else:
            out |= shape_mask(thing.shape, thing.centroids(frames), thing.size + margin)
    return out


def with_change(spec: ClipSpec, **change: str) -> ClipSpec:
    """The same clip with the first object's color, shape or direction, or the background, changed:
    the target of a one-attribute edit."""
    first, rest = spec.things[0], spec.things[1:]
    bg = change.pop("background", spec.background)
    thing = dataclasses.replace(first, **change)
    return ClipSpec((thing, *rest), bg, spec.seed)
