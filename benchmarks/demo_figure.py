"""docs/demo.png: source | reconstruction | edit of `cogedit demo`, frames 0, 8 and 16.

    python benchmarks/demo_figure.py [--out docs/demo.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.jobs.demo import DEMO_PROMPTS, DEMO_SETTINGS, demo_model  # noqa: E402
from engine.video.clips import DEMO_VIDEO  # noqa: E402
from engine.workflow import edit, invert  # noqa: E402

FRAMES = (0, 8, 16)


def main() -> None:
    from PIL import Image

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("docs/demo.png"))
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp())
    inv = invert(DEMO_VIDEO, demo_model(cache), cache_dir=cache, device="cpu", **DEMO_SETTINGS)
    edited = edit(inv, list(DEMO_PROMPTS), cache_dir=cache, device="cpu", output="frames").frames
    rows = [inv.frames().numpy(), edited[0], edited[1]]  # source, reconstruction, edit
    grid = np.concatenate([np.concatenate([row[i] for i in FRAMES], axis=1) for row in rows], axis=0)
    image = Image.fromarray(grid)
    image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
