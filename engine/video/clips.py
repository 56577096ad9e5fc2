"""The clips cogedit ships: short cuts of one Big Buck Bunny shot (CC-BY 3.0 (c) Blender Foundation).

The proxy (engine/models/proxy.py) was trained on all but the held-out one, which the demo edits.

    assets/clips/<name>.mp4     192x108, 25 fps, cut from shared/videos/bigbuckbunny.mp4
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CLIPS_DIR = Path(__file__).resolve().parents[1] / "assets" / "clips"


@dataclass(frozen=True)
class Clip:
    """A time range of bigbuckbunny.mp4 shipped as its own small mp4, with honest captions."""

    name: str
    start: int  # first source frame
    frames: int
    captions: tuple[str, ...]
    held_out: bool = False  # never shown to the proxy while training

    @property
    def path(self) -> Path:
        return CLIPS_DIR / f"{self.name}.mp4"


# One continuous shot: a big grey rabbit climbs out of his burrow under a tree on a grassy hill,
# stands up and stretches. Frames 91-98 are left out so the held-out range doesn't touch training.
CLIPS = (
    Clip("bunny_burrow", 0, 33, (
        "a big grey rabbit climbs out of a burrow in a grassy hill",
        "a cartoon rabbit crawls out of a hole under a tree, green grass, sunny day",
    )),
    Clip("bunny_rise", 33, 33, (
        "a big grey rabbit stands up in front of his burrow on a grassy hill",
        "a fat cartoon rabbit gets up beside a tree, green grass and rocks, sunny day",
    )),
    Clip("bunny_stretch", 66, 25, (
        "a big grey rabbit stretches his arms in front of a burrow on a grassy hill",
        "a fat cartoon rabbit stretches beside a tree, green grass, sunny day",
    )),
    Clip("bunny_heldout", 99, 33, (
        "a big grey rabbit stretches an arm up in front of a burrow on a grassy hill",
    ), held_out=True),
)
HELD_OUT = next(c for c in CLIPS if c.held_out)
DEMO_VIDEO: Path = HELD_OUT.path  # Big Buck Bunny, never shown to the proxy while training
