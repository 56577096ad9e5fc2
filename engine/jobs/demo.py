"""`cogedit demo`: the whole job on the trained proxies and clips they never saw, on a CPU.

First, what works: the shapes proxy inverts a held-out shapes clip (a color x shape pair it never
saw) and edits it towards another color, once everywhere and once with a mask around the object,
written as one labelled mp4 (source | edit | edit in a mask): with the mask the object turns the
new color and the rest of the frame stays; without it the object drifts. Then the Big Buck Bunny
proxy inverts a held-out clip and renders a reconstruction and an edit towards another of its
training captions: a 7M-parameter model that saw one shot, so both come out close to its blurry
reconstruction (docs/quality.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache.layout import cache_root
from engine.models.proxy import PROXY_FRAMES, PROXY_HEIGHT, PROXY_WIDTH, write_proxy_model
from engine.report import Reporter
from engine.stages.decode import write_video
from engine.video import shapes
from engine.video.clips import CLIPS, DEMO_VIDEO, HELD_OUT
from engine.video.labels import labelled
from engine.workflow import EditResult, edit, invert

# The proxy knows only its captions' words: the first prompt reconstructs the clip (it is the
# inversion's source prompt), the second edits it towards another of its training captions.
DEMO_PROMPTS = (HELD_OUT.captions[0], CLIPS[0].captions[1])
# The proxy's training size; small enough for a 2-core CPU.
DEMO_SETTINGS = dict(steps=10, frames=PROXY_FRAMES, height=PROXY_HEIGHT, width=PROXY_WIDTH)
# "a yellow triangle moving right on a gray background": held out, the proxy never saw a yellow triangle.
SHAPES_SEED = 4
# Held-out shapes clips offered beside the Big Buck Bunny ones (the web app's bundled clips), the demo's first.
SHAPES_SEEDS = (SHAPES_SEED, 1, 5)
SHAPES_COLOR = "red"
SHAPES_MARGIN = 4  # px: the mask is the object drawn this much larger, frame by frame


@dataclass(frozen=True)
class ShapesDemo:
    """The shapes half: the edit everywhere and inside the mask (their frames), and the mp4 of
    source | edit | masked edit."""

    whole: EditResult
    masked: EditResult
    comparison: Path


def demo_model(cache_dir: str | Path | None = None, world: str = "bunny") -> Path:
    """The proxy checkpoint of `world` the demo uses, copied once under the cache folder."""
    path = cache_root(cache_dir) / ("demo-model" if world == "bunny" else f"demo-model-{world}")
    if not (path / "TRAINING.json").exists():
        write_proxy_model(path, world)
    return path


def shapes_clip(seed: int, folder: Path) -> Path:
    """The held-out shapes clip of `seed` as an mp4 in `folder`, drawn once (not shipped: the seed is the clip)."""
    video = folder / f"shapes_heldout_{seed}.mp4"
    if not video.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_video(shapes.render(shapes.clip_spec(seed, "heldout"))[0], video, fps=8.0)
    return video


def shapes_object_mask(seed: int, folder: Path) -> Path:
    """A mask video of the clip of `seed`: white around its objects (the demo's margin), frame by
    frame; the drawn world knows where they are, so a local edit needs no box."""
    path = folder / f"shapes_heldout_{seed}-object-mask.mp4"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        around = shapes.around(shapes.clip_spec(seed, "heldout"), SHAPES_MARGIN)
        write_video(np.repeat(around[..., None] * np.uint8(255), 3, axis=-1), path, fps=8.0)
    return path


def demo(out_dir: str | Path = "cogedit-demo", *, cache_dir: str | Path | None = None, reporter: Reporter | None = None) -> EditResult:
    """Invert the held-out clip with the proxy, then render a reconstruction and an edit from the
    cache. A second run reuses the inversion and overwrites the demo's own mp4 files."""
    reporter = reporter or Reporter(device="cpu")
    model = demo_model(cache_dir)
    inv = invert(DEMO_VIDEO, model, cache_dir=cache_dir, device="cpu", reporter=reporter, source_prompt=HELD_OUT.captions[0], **DEMO_SETTINGS)
    # Upstream's full injection window: on the proxy shorter windows lose most of the source's
    # structure and gain no adherence (benchmarks/results/QUALITY.md).
    return edit(inv, list(DEMO_PROMPTS), out_dir=out_dir, force=True, cache_dir=cache_dir, device="cpu", reporter=reporter)


def shapes_demo(out_dir: str | Path = "cogedit-demo", *, cache_dir: str | Path | None = None, reporter: Reporter | None = None) -> ShapesDemo:
    """A color edit of a held-out shapes clip on the shapes proxy, without and with a mask. A
    second run reuses the inversion and overwrites the demo's own mp4."""
    reporter = reporter or Reporter(device="cpu")
    model = demo_model(cache_dir, "shapes")
    spec = shapes.clip_spec(SHAPES_SEED, "heldout")
    video = shapes_clip(SHAPES_SEED, cache_root(cache_dir) / "demo-clips")
    inv = invert(video, model, cache_dir=cache_dir, device="cpu", reporter=reporter, source_prompt=spec.caption, **DEMO_SETTINGS)
    prompt = [shapes.with_change(spec, color=SHAPES_COLOR).caption]
    common = dict(output="frames", cache_dir=cache_dir, device="cpu", reporter=reporter)
    whole = edit(inv, prompt, **common)
    masked = edit(inv, prompt, mask=shapes.around(spec, SHAPES_MARGIN), **common)
    comparison = Path(out_dir) / f"shapes-{SHAPES_COLOR}-source-edit-masked.mp4"
    comparison.parent.mkdir(parents=True, exist_ok=True)
    panels = [inv.frames().numpy(), whole.frames[0], masked.frames[0]]
    write_video(labelled(panels, ["source", "edit", "edit in a mask"], prompt[0]), comparison, inv.entry.fps)
    return ShapesDemo(whole, masked, comparison)
