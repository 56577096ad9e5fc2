"""The trained proxies: small CogVideoX models that have learned something, one per world.

Random tiny weights show that the workflow runs, not whether an edit or an inversion is any
good. The proxy is trained by `benchmarks/train_proxy.py` on the clips in `engine/video/clips.py` (all cut
from one shot of Big Buck Bunny, CC-BY 3.0 (c) Blender Foundation) and ships in `assets/proxy/` in the
CogVideoX-5b folder layout, so the engine loads it like the real model. The shapes proxy is
trained by `benchmarks/train_shapes.py` on the synthetic shapes world (`engine/video/shapes.py`),
where every pixel's truth is known, so edits can be measured exactly. Their numbers are the
proxies', never CogVideoX-5B's.

    assets/
    ├── clips/<name>.mp4     192x108, 25 fps, cut from shared/videos/bigbuckbunny.mp4
    ├── proxy/               model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
    │                        scheduler/, TRAINING.json (how it was trained)
    └── shapes/              the same layout: the shapes proxy
"""

from __future__ import annotations

import shutil
from pathlib import Path

from engine.errors import ModelError

PROXY_DIR = Path(__file__).resolve().parents[1] / "assets" / "proxy"
SHAPES_DIR = Path(__file__).resolve().parents[1] / "assets" / "shapes"
WORLDS = {"bunny": (PROXY_DIR, "benchmarks/train_proxy.py"), "shapes": (SHAPES_DIR, "benchmarks/train_shapes.py")}

# The size the proxies were trained at (17 frames = 5 latent frames of 12x18), and their frame
# rates: the bunny proxy learned runs of consecutive frames of the 25 fps clips; the shapes world
# moves at its speed per frame and its clips are written at 8 fps. Both folders carry these in
# model_index.json, so a run without --frames/--height/--width uses them.
PROXY_FRAMES, PROXY_HEIGHT, PROXY_WIDTH = 17, 96, 144
WORLD_FPS = {"bunny": 25.0, "shapes": 8.0}


def proxy_defaults(world: str) -> dict[str, float]:
    """The model_index.json defaults of the proxy of `world`."""
    return {"frames": PROXY_FRAMES, "height": PROXY_HEIGHT, "width": PROXY_WIDTH, "fps": WORLD_FPS[world]}


def write_proxy_model(path: str | Path, world: str = "bunny") -> Path:
    """Copy the trained proxy of `world` ("bunny" or "shapes") to `path` (a folder in the
    CogVideoX-5b layout) and return it."""
    if world not in WORLDS:
        raise ModelError(f"there is no proxy of the world {world!r}; pick one of {', '.join(WORLDS)}")
    source, trainer = WORLDS[world]
    if not (source / "model_index.json").exists():
        raise ModelError(f"the trained {world} proxy is missing from {source}; reinstall cogedit, or train it with `python {trainer}` on a GPU")
    path = Path(path)
    shutil.copytree(source, path, dirs_exist_ok=True)
    return path
