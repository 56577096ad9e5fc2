"""docs/demo.png: source | reconstruction | edit of `cogedit demo`'s Big Buck Bunny half, frames 0,
8 and 16; with --shapes, docs/shapes-demo.png: the shapes half's labelled source | edit | edit in a
mask at the same frames (the README's first picture).

    python benchmarks/demo_figure.py [--out docs/demo.png]
    python benchmarks/demo_figure.py --shapes [--out docs/shapes-demo.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.jobs.demo import DEMO_PROMPTS, DEMO_SETTINGS, demo_model, shapes_demo  # noqa: E402
from engine.video.clips import DEMO_VIDEO  # noqa: E402
from engine.workflow import edit, invert  # noqa: E402

FRAMES = (0, 8, 16)


def main() -> None:
    from PIL import Image

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shapes", action="store_true", help="the shapes half: its labelled comparison video's frames, one above the other")
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp())
    if args.shapes:
        import decord

        video = decord.VideoReader(str(shapes_demo(cache / "out", cache_dir=cache).comparison))
        image = Image.fromarray(np.concatenate([video[i].asnumpy() for i in FRAMES], axis=0))
        image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(args.out or "docs/shapes-demo.png")
        print(args.out or "docs/shapes-demo.png")
        return
    inv = invert(DEMO_VIDEO, demo_model(cache), cache_dir=cache, device="cpu", **DEMO_SETTINGS)
    edited = edit(inv, list(DEMO_PROMPTS), cache_dir=cache, device="cpu", output="frames").frames
    rows = [inv.frames().numpy(), edited[0], edited[1]]  # source, reconstruction, edit
    grid = np.concatenate([np.concatenate([row[i] for i in FRAMES], axis=1) for row in rows], axis=0)
    image = Image.fromarray(grid)
    image.resize((image.width * 2, image.height * 2), Image.NEAREST).save(args.out or "docs/demo.png")
    print(args.out or "docs/demo.png")


if __name__ == "__main__":
    main()
