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
from engine.video.clips import CLIPS, Clip


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

    def bundled_clip(self, name: str) -> tuple[Path, Clip]:
        """The bundled clip `name`, copied into the uploads folder (so that it can be served)."""
        clip = next((c for c in CLIPS if c.name == name), None)
        if clip is None:
            raise SettingsError(f"no bundled clip is named {name!r}; pick one of {', '.join(c.name for c in CLIPS)}")
        copy = self.uploads / "clips" / clip.path.name
        if not copy.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(clip.path, copy)
        return copy, clip
