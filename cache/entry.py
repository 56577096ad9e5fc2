"""One inversion's manifest as a typed object: the only code that reads or writes its keys.

What the engine hashes into an inversion's id is saved whole under `settings.identity`, beside
the settings as the user gave them; the rest is per-stage status, file records and the facts
`cache ls/show` print. The JSON layout is `cache.manifest`'s; this class gives it names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cache.atomic import FileRecord, load_tensors, save_tensors
from cache.layout import EntryPaths
from cache.manifest import FORMAT_VERSION, file_record, new_manifest, read_manifest, record_file, touch, write_manifest


class InversionEntry:
    """A cache entry of kind "inversion": its paths and its manifest, read and written by name."""

    def __init__(self, paths: EntryPaths, manifest: dict[str, Any]) -> None:
        self.paths = paths
        self._m = manifest

    # ------------------------------------------------------------------ reading and writing

    @classmethod
    def read(cls, paths: EntryPaths) -> InversionEntry | None:
        """The entry's manifest; None when missing or unreadable (a miss)."""
        manifest = read_manifest(paths.manifest)
        return None if manifest is None else cls(paths, manifest)

    @classmethod
    def new(cls, paths: EntryPaths, identity: dict[str, Any], settings: dict[str, Any], summary: dict[str, Any]) -> InversionEntry:
        """A fresh, incomplete entry; `identity` is everything its id hashes."""
        return cls(paths, new_manifest(paths.id, "inversion", settings={**settings, "format": FORMAT_VERSION, "identity": identity}, summary=summary))

    def write(self) -> None:
        write_manifest(self.paths.manifest, self._m)

    def touch(self) -> None:
        touch(self.paths.manifest)

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as written (JSON): for display and tests, not for the engine."""
        return self._m

    # ------------------------------------------------------------------ settings and facts

    @property
    def id(self) -> str:
        return self.paths.id

    @property
    def complete(self) -> bool:
        return self._m.get("complete") is True

    def mark_complete(self) -> None:
        self._m["complete"] = True
        self.write()

    @property
    def steps(self) -> int:
        return int(self._m["settings"]["invert"]["steps"])

    @property
    def source_prompt(self) -> str:
        return self._m["settings"]["invert"]["source_prompt"]

    @property
    def dtype_name(self) -> str:
        return self._m["settings"]["dtype"]

    @property
    def model_key(self) -> str:
        return self._m["settings"]["model"]["key"]

    @property
    def model_source(self) -> str:
        return self._m["settings"]["model"]["source"]

    @property
    def frame_settings(self) -> dict[str, Any]:
        return self._m["settings"]["frames"]

    @property
    def frames(self) -> int:
        """How many frames were selected (known once encoded)."""
        return int(self._m["summary"].get("frames", self.frame_settings["max_frames"] or 0))

    @property
    def output_frames(self) -> int:
        """The frames an edit has: the selected ones less the repeats that padded them to 4k+1."""
        return int(self._m["summary"].get("output_frames", self.frames))

    @property
    def fps(self) -> float:
        return float(self._m["summary"].get("fps", 8.0))

    # ------------------------------------------------------------------ stages

    @property
    def encoded(self) -> bool:
        return self._m["stages"].get("encode") == "done"

    def mark_encoded(self, frames: int, latent_shape: list[int]) -> None:
        self._m["stages"]["encode"] = "done"
        self._m["summary"].update(frames=frames, latent_shape=latent_shape)
        self.write()

    @property
    def steps_done(self) -> int:
        """Inversion steps finished (and their latents recorded): where a resume starts."""
        return int(self._m["stages"].get("invert", {}).get("done", 0))

    def mark_step(self, i: int) -> None:
        """Step i is on disk; written after the step's file, so a crash loses at most one step."""
        self._m["stages"]["invert"] = {"done": i + 1, "total": self.steps}
        self.write()

    @property
    def verify(self) -> dict[str, Any] | None:
        """The round-trip check's result (`invert --verify`), if one ran."""
        return self._m.get("verify")

    def set_verify(self, result: dict[str, Any]) -> None:
        self._m["verify"] = result
        self.write()

    # ------------------------------------------------------------------ files

    def rel(self, path: Path) -> str:
        return self.paths.relative(path)

    def record_of(self, path: Path) -> FileRecord | None:
        return file_record(self._m, self.rel(path))

    def has_file(self, path: Path) -> bool:
        return self.rel(path) in self._m["files"]

    def record(self, path: Path, record: FileRecord) -> None:
        record_file(self._m, self.rel(path), record)

    def forget(self, path: Path) -> None:
        self._m["files"].pop(self.rel(path), None)

    def files_under(self, directory: Path) -> list[Path]:
        """Recorded files below `directory`, sorted."""
        prefix = self.rel(directory) + "/"
        return [self.paths.dir / rel for rel in sorted(self._m["files"]) if rel.startswith(prefix)]

    def size_of(self, paths: list[Path]) -> int:
        return sum(self._m["files"][self.rel(p)]["bytes"] for p in paths)

    def save(self, path: Path, tensors: dict[str, torch.Tensor], **meta: Any) -> None:
        """Write a tensor file atomically and record its checksum (the manifest is written later)."""
        self.record(path, save_tensors(path, tensors, {k: str(v) for k, v in meta.items()}))

    def load(self, path: Path, name: str) -> torch.Tensor:
        """Tensor `name` of a recorded file, checked against its record."""
        return load_tensors(path, self.record_of(path))[name]

    def missing_files(self) -> list[str]:
        """Recorded files that are gone or have another size: a cheap check for a cache hit."""
        bad = []
        for rel, rec in self._m["files"].items():
            path = self.paths.dir / rel
            if not path.is_file() or path.stat().st_size != rec.get("bytes"):
                bad.append(rel)
        return bad

    # ------------------------------------------------------------------ stored attention

    def stores(self) -> dict[str, dict[str, Any]]:
        """Disk stores of attention by store key, as recorded."""
        return self._m.get("attention", {})

    def set_store(self, key: str, info: dict[str, Any]) -> None:
        self._m.setdefault("attention", {})[key] = info
