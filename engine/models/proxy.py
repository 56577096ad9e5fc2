"""The trained proxy: a small CogVideoX that has learned Big Buck Bunny footage.

Random tiny weights show that the workflow runs, not whether an edit or an inversion is any
good. The proxy is trained by `benchmarks/train_proxy.py` on the clips in `engine/video/clips.py` (all cut
from one shot of Big Buck Bunny, CC-BY 3.0 (c) Blender Foundation) and ships in `assets/proxy/` in the
CogVideoX-5b folder layout, so the engine loads it like the real model. Its numbers are the
proxy's, never CogVideoX-5B's.

    assets/
    ├── clips/<name>.mp4     192x108, 25 fps, cut from shared/videos/bigbuckbunny.mp4
    └── proxy/               model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
                             scheduler/, TRAINING.json (how it was trained)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from engine.errors import ModelError

PROXY_DIR = Path(__file__).resolve().parents[1] / "assets" / "proxy"

# The size the proxy was trained at (17 frames = 5 latent frames of 12x18).
PROXY_FRAMES, PROXY_HEIGHT, PROXY_WIDTH = 17, 96, 144


def write_proxy_model(path: str | Path) -> Path:
    """Copy the trained proxy checkpoint to `path` (a folder in the CogVideoX-5b layout) and return it."""
    if not (PROXY_DIR / "model_index.json").exists():
        raise ModelError(
            f"the trained proxy is missing from {PROXY_DIR}; reinstall cogedit, or train it with "
            "`python benchmarks/train_proxy.py train --out engine/assets/proxy` on a GPU"
        )
    path = Path(path)
    shutil.copytree(PROXY_DIR, path, dirs_exist_ok=True)
    return path
