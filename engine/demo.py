"""`cogedit demo`: the whole job on a tiny random model and a real clip, in about a minute on a CPU."""

from __future__ import annotations

from pathlib import Path

from cache.layout import cache_root
from engine.report import Reporter
from engine.tiny import build_tiny_model
from engine.video import DEMO_VIDEO
from engine.workflow import EditResult, edit, invert

DEMO_PROMPTS = ("a watercolor painting of cars passing a fence", "a charcoal sketch of the same street at night")
# Small enough for a 2-core CPU; the tiny transformer was built for 96x160 (12x20 latents).
DEMO_SETTINGS = dict(steps=10, frames=17, height=96, width=160)


def demo_model(cache_dir: str | Path | None = None) -> Path:
    """The tiny checkpoint the demo uses, built once under the cache folder."""
    path = cache_root(cache_dir) / "demo-model"
    if not (path / "model_index.json").exists():
        build_tiny_model(path)
    return path


def demo(out_dir: str | Path = "cogedit-demo", *, cache_dir: str | Path | None = None, reporter: Reporter | None = None, force: bool = False) -> EditResult:
    """Invert the bundled clip with the tiny model, then render two edits from the cache."""
    reporter = reporter or Reporter(device="cpu")
    model = demo_model(cache_dir)
    inv = invert(DEMO_VIDEO, model, cache_dir=cache_dir, device="cpu", reporter=reporter, **DEMO_SETTINGS)
    return edit(inv, list(DEMO_PROMPTS), inject_steps="0:0.6", out_dir=out_dir, force=force, cache_dir=cache_dir, device="cpu", reporter=reporter)
