"""What the API hands back: an `Inversion` handle into the cache, and an `EditResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cache.entry import InversionEntry
from cache.layout import CacheLayout, EntryPaths, cache_root, resolve_entry_id
from engine.errors import CogeditError
from engine.stages.attention_store import MemoryStores, available
from engine.stages.verify import with_verdict

_DTYPES = {"torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16, "torch.float32": torch.float32}


@dataclass(frozen=True)
class Inversion:
    """A finished inversion in the cache: the handle edits start from.

    In-memory stored attention (`attention_store="cpu"`) belongs to this handle and lives until
    `release()`; everything else is in the cache and outlives it.
    """

    entry: InversionEntry
    layout: CacheLayout
    memory: MemoryStores = field(default_factory=MemoryStores, compare=False, repr=False)

    @property
    def id(self) -> str:
        return self.entry.id

    @property
    def paths(self) -> EntryPaths:
        return self.entry.paths

    @property
    def manifest(self) -> dict[str, Any]:
        return self.entry.manifest

    @property
    def steps(self) -> int:
        return self.entry.steps

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.entry.dtype_name]

    @property
    def verify(self) -> dict[str, Any] | None:
        """The round-trip check (`invert(..., verify=True)`): latent error, PSNR and the verdict
        (good, poor or failed: docs/verify.md), if it ran."""
        return with_verdict(self.entry.verify) if self.entry.verify is not None else None

    def latents(self) -> torch.Tensor:
        return self.entry.load(self.paths.latents, "latents")

    def frames(self) -> torch.Tensor:
        return self.entry.load(self.paths.frames, "frames")

    def trajectory(self) -> list[torch.Tensor]:
        """The latent after every inversion step; the last one is the inverted noise."""
        return [self.entry.load(self.paths.step_file(i), "latent") for i in range(self.steps)]

    def noise(self) -> torch.Tensor:
        """The inverted noise alone (the last step's latent), without reading the other steps."""
        return self.entry.load(self.paths.step_file(self.steps - 1), "latent")

    def stores(self) -> dict[str, dict[str, Any]]:
        """Stored attention of this inversion, by store key: on disk, and in this handle's memory."""
        return available(self.entry, self.memory)

    def store_files(self, key: str) -> list[Path]:
        """The files of disk store `key`, as the manifest records them (all its blocks of all its steps)."""
        return self.entry.files_under(self.paths.attention_store(key))

    def release(self) -> None:
        """Free this handle's in-memory stored attention."""
        self.memory.release()


@dataclass(frozen=True)
class EditResult:
    """What an edit wrote: one mp4 and one side-by-side per prompt, and the edited latents.

    `latents` and `frames` hold the prompts rendered now, in order: all of them, less `skipped`
    (with skip_existing, the prompts whose files were already there)."""

    inversion_id: str
    prompts: tuple[str, ...]
    videos: tuple[Path, ...]
    side_by_side: tuple[Path, ...]
    latents: torch.Tensor | None  # [K, F', C, h, w] on the CPU (None on workers other than 0 of gpus=N)
    frames: Any = None  # uint8 [K, F, H, W, 3] with output="frames"
    skipped: tuple[str, ...] = ()


def open_inversion(entry_id: str, cache_dir: str | Path | None = None) -> Inversion:
    """The finished inversion `entry_id` (or a unique prefix of it) from the cache."""
    layout = CacheLayout(cache_root(cache_dir))
    entry_id = resolve_entry_id(layout, entry_id)
    entry = InversionEntry.read(layout.entry(entry_id))
    if entry is None:
        raise CogeditError(f"inversion {entry_id} has no readable manifest; remove it with `cogedit cache rm {entry_id}` and invert again")
    if not entry.complete:
        raise CogeditError(f"inversion {entry_id} is unfinished; run `cogedit invert` again with the same inputs to resume it")
    entry.touch()
    return Inversion(entry, layout)
