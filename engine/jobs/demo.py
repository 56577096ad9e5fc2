"""`cogedit demo`: the whole job on the trained proxy and a Big Buck Bunny clip it never saw, on a CPU."""

from __future__ import annotations

from pathlib import Path

from cache.layout import cache_root
from engine.models.proxy import PROXY_FRAMES, PROXY_HEIGHT, PROXY_WIDTH, write_proxy_model
from engine.report import Reporter
from engine.video.clips import CLIPS, DEMO_VIDEO, HELD_OUT
from engine.workflow import EditResult, edit, invert

# The proxy knows only its captions' words: the first prompt reconstructs the clip (it is the
# inversion's source prompt), the second edits it towards another of its training captions.
DEMO_PROMPTS = (HELD_OUT.captions[0], CLIPS[0].captions[1])
# The proxy's training size; small enough for a 2-core CPU.
DEMO_SETTINGS = dict(steps=10, frames=PROXY_FRAMES, height=PROXY_HEIGHT, width=PROXY_WIDTH, source_prompt=HELD_OUT.captions[0])


def demo_model(cache_dir: str | Path | None = None) -> Path:
    """The proxy checkpoint the demo uses, copied once under the cache folder."""
    path = cache_root(cache_dir) / "demo-model"
    if not (path / "TRAINING.json").exists():
        write_proxy_model(path)
    return path


def demo(out_dir: str | Path = "cogedit-demo", *, cache_dir: str | Path | None = None, reporter: Reporter | None = None) -> EditResult:
    """Invert the held-out clip with the proxy, then render a reconstruction and an edit from the
    cache. A second run reuses the inversion and overwrites the demo's own mp4 files."""
    reporter = reporter or Reporter(device="cpu")
    model = demo_model(cache_dir)
    inv = invert(DEMO_VIDEO, model, cache_dir=cache_dir, device="cpu", reporter=reporter, **DEMO_SETTINGS)
    # Upstream's full injection window: on the proxy shorter windows lose most of the source's
    # structure and gain no adherence (benchmarks/results/QUALITY.md).
    return edit(inv, list(DEMO_PROMPTS), out_dir=out_dir, force=True, cache_dir=cache_dir, device="cpu", reporter=reporter)
