"""The two folders the web app may read and write: the cache and the uploads folder.

Every path that arrives in a request (an uploaded clip) is checked here, and Gradio is told to
serve these two folders only (its own uploads land in the uploads folder, see `webui.start`).
A bundled clip is named, not given as a path, and is copied into the uploads folder before use.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from cache.layout import CacheLayout
from engine.errors import SettingsError
from engine.jobs.demo import SHAPES_SEEDS, shapes_clip, shapes_object_mask
from engine.video import shapes
from engine.video.clips import CLIPS


@dataclass(frozen=True)
class Folders:
    cache: Path
    uploads: Path

    @classmethod
    def make(cls, cache_dir: str | Path | None = None, uploads_dir: str | Path | None = None) -> Folders:
        """The folders, created and resolved (uploads default to `<cache>/uploads`)."""
        layout = CacheLayout.from_dir(cache_dir)
        layout.ensure()
        uploads = Path(uploads_dir).expanduser() if uploads_dir else layout.uploads_dir
        uploads.mkdir(parents=True, exist_ok=True)
        return cls(layout.root.resolve(), uploads.resolve())

    def check(self, path: str | Path) -> Path:
        """`path`, resolved (links followed), if it lies in the cache or the uploads folder."""
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in (self.cache, self.uploads)):
            raise SettingsError(f"{path} is outside the cache and uploads folders; upload the clip, or pick a bundled one")
        return resolved

    def bundled_clip(self, name: str) -> tuple[Path, str]:
        """The bundled clip `name` (a Big Buck Bunny cut, or a held-out shapes clip drawn now) in
        the uploads folder, so that it can be served, and its caption."""
        shapes_seeds = {f"shapes_heldout_{seed}": seed for seed in SHAPES_SEEDS}
        if name in shapes_seeds:
            seed = shapes_seeds[name]
            return shapes_clip(seed, self.uploads / "clips"), shapes.clip_spec(seed, "heldout").caption
        clip = next((c for c in CLIPS if c.name == name), None)
        if clip is None:
            raise SettingsError(f"no bundled clip is named {name!r}; pick one of {', '.join(bundled_names())}")
        copy = self.uploads / "clips" / clip.path.name
        if not copy.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(clip.path, copy)
        return copy, clip.captions[0]


    def object_mask(self, video_name: str) -> Path:
        """The mask around the moving object of the bundled shapes clip `video_name` (a drawn clip
        knows where its object is), in the uploads folder."""
        seeds = {f"shapes_heldout_{seed}.mp4": seed for seed in SHAPES_SEEDS}
        if video_name not in seeds:
            raise SettingsError(f"{video_name} is not a bundled shapes clip, so where its object is is not known: draw a box around it instead")
        return shapes_object_mask(seeds[video_name], self.uploads / "clips")


def bundled_names(world: str = "shapes") -> list[str]:
    """The bundled clips' names, those of `world` (the proxy's) first."""
    drawn = [f"shapes_heldout_{seed}" for seed in SHAPES_SEEDS]
    cut = [c.name for c in sorted(CLIPS, key=lambda c: not c.held_out)]  # the clip the proxy never saw first
    return drawn + cut if world == "shapes" else cut + drawn
