"""Where cache files live. Every cache path is built here and nowhere else.

    <root>/                                 --cache-dir, else $COGEDIT_CACHE, else ~/.cache/cogedit
    ├── inversions/
    │   └── <id>/                           one inversion; <id> = stable_hash of everything that
    │       │                               changes its result (16-64 lowercase hex characters)
    │       ├── manifest.json               settings (with `identity`: all the id hashes), summary,
    │       │                               per-file sha256 + size, stage status, round-trip check;
    │       │                               written last, so a crash never leaves an entry that looks whole
    │       ├── frames.safetensors          the selected source frames
    │       ├── latents.safetensors         VAE latents of those frames
    │       ├── trajectory/
    │       │   ├── step_0000.safetensors   latent after each inversion step (resume point)
    │       │   └── ...
    │       ├── thumbnails.png              a strip of source frames (`cogedit ui`'s gallery)
    │       ├── edits/                      edits rendered into the cache (`cogedit ui`): per edit
    │       │   └── <stem>.mp4, <stem>-side-by-side.mp4, <stem>.json (its prompt and settings)
    │       └── attention/                  stored reference keys/values (a window of steps x layers):
    │           └── <store key>/t_0999/b_07.safetensors   one file per timestep and block
    ├── prompts/
    │   └── <model_key>/
    │       └── <prompt_key>.safetensors    T5 prompt embeddings, shared by every entry of one model
    ├── compile/
    │   └── <key>.bin                       --compile's kernels (torch cache artifacts) per torch, GPU, settings
    ├── locks/
    │   └── <id>.lock                       outside the entry, so removing an entry never deletes a held lock
    ├── trash/                              entries being removed: renamed here first, then deleted
    └── uploads/                            `cogedit ui`'s uploaded clips (its default --uploads-dir)

Every file is written to `.<name>.tmp-<pid>-<random>` in its own folder and renamed into place.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cache.errors import InvalidEntryIdError, ReadOnlyCacheError

ENV_VAR = "COGEDIT_CACHE"
MIN_PREFIX = 4

_ID_RE = re.compile(r"[0-9a-f]{16,64}")
_PREFIX_RE = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},64}}")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: `cache_dir`, else $COGEDIT_CACHE, else ~/.cache/cogedit."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "cogedit"


def validate_entry_id(entry_id: str) -> str:
    """Return `entry_id` if it is 16-64 lowercase hex characters, else raise InvalidEntryIdError.

    Ids become folder names, so anything else (`../x`, `/etc`, "") must be refused here.
    """
    if not isinstance(entry_id, str) or _ID_RE.fullmatch(entry_id) is None:
        raise InvalidEntryIdError(
            f"{entry_id!r} is not a cache id (ids are 16-64 lowercase hex characters) "
            "— copy one from `cogedit cache ls`"
        )
    return entry_id


def _validate_key(value: str, what: str) -> str:
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise InvalidEntryIdError(
            f"{what} {value!r} is not a cache key (16-64 lowercase hex characters) "
            "— build it with cache.keys.stable_hash"
        )
    return value


@dataclass(frozen=True)
class EntryPaths:
    """Every path of one inversion entry."""

    id: str
    dir: Path
    manifest: Path
    latents: Path
    frames: Path
    trajectory_dir: Path
    attention_dir: Path
    edits_dir: Path
    thumbnails: Path
    lock: Path

    def step_file(self, i: int) -> Path:
        """Trajectory file of step `i`: trajectory/step_0007.safetensors."""
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i <= 9999:
            raise ValueError(f"step index must be an int in 0..9999, got {i!r}")
        return self.trajectory_dir / f"step_{i:04d}.safetensors"

    def attention_store(self, key: str) -> Path:
        """Folder of one stored-attention store: attention/<store key>/."""
        return self.attention_dir / key

    def attention_block(self, key: str, t: int, block: int, window: int = 0) -> Path:
        """One timestep and block of a store: attention/<key>/t_0999/b_07.safetensors; a long clip's
        later windows each have their own: attention/<key>/t_0999/w_01/b_07.safetensors."""
        step = self.attention_store(key) / f"t_{t:04d}"
        return (step / f"w_{window:02d}" if window else step) / f"b_{block:02d}.safetensors"

    def relative(self, path: Path) -> str:
        """`path` relative to the entry dir, as the posix name the manifest uses."""
        return Path(path).relative_to(self.dir).as_posix()


@dataclass(frozen=True)
class CacheLayout:
    """The cache tree under one root (see the module docstring)."""

    root: Path

    @classmethod
    def from_dir(cls, cache_dir: str | os.PathLike[str] | None = None) -> "CacheLayout":
        """Layout for `cache_dir`, $COGEDIT_CACHE or the default, as `cache_root` picks."""
        return cls(cache_root(cache_dir))

    @property
    def entries_dir(self) -> Path:
        return self.root / "inversions"

    @property
    def prompts_dir(self) -> Path:
        return self.root / "prompts"

    @property
    def compile_dir(self) -> Path:
        return self.root / "compile"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    @property
    def trash_dir(self) -> Path:
        return self.root / "trash"

    @property
    def uploads_dir(self) -> Path:
        return self.root / "uploads"

    def entry(self, entry_id: str) -> EntryPaths:
        """Paths of entry `entry_id` (validated, so it can never escape the cache)."""
        entry_id = validate_entry_id(entry_id)
        d = self.entries_dir / entry_id
        return EntryPaths(
            id=entry_id,
            dir=d,
            manifest=d / "manifest.json",
            latents=d / "latents.safetensors",
            frames=d / "frames.safetensors",
            trajectory_dir=d / "trajectory",
            attention_dir=d / "attention",
            edits_dir=d / "edits",
            thumbnails=d / "thumbnails.png",
            lock=self.locks_dir / f"{entry_id}.lock",
        )

    def prompt_file(self, model_key: str, prompt_key: str) -> Path:
        """Embedding file of one prompt under one model."""
        model_key = _validate_key(model_key, "model key")
        prompt_key = _validate_key(prompt_key, "prompt key")
        return self.prompts_dir / model_key / f"{prompt_key}.safetensors"

    def ensure(self) -> None:
        """Create the cache folders; ReadOnlyCacheError if the cache cannot be written."""
        for d in (self.root, self.entries_dir, self.prompts_dir, self.locks_dir):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ReadOnlyCacheError(
                    f"cannot create cache folder {d}: {exc.strerror or exc} "
                    "— pass --cache-dir to a writable folder or set COGEDIT_CACHE"
                ) from exc
            # mkdir(exist_ok=True) succeeds on an existing read-only folder, so check explicitly.
            if not os.access(d, os.W_OK | os.X_OK):
                raise ReadOnlyCacheError(
                    f"cache folder {d} is not writable "
                    "— pass --cache-dir to a writable folder or set COGEDIT_CACHE"
                )

    def entry_ids(self) -> list[str]:
        """Ids of every entry folder on disk, complete or not, sorted."""
        try:
            children = list(self.entries_dir.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(p.name for p in children if _ID_RE.fullmatch(p.name) and p.is_dir())


def resolve_entry_id(layout: CacheLayout, prefix: str) -> str:
    """The one entry whose id starts with `prefix` (>= 4 hex characters), complete or not."""
    wanted = prefix.strip().lower() if isinstance(prefix, str) else ""
    if _PREFIX_RE.fullmatch(wanted) is None:
        raise InvalidEntryIdError(
            f"{prefix!r} is not an id prefix (use at least {MIN_PREFIX} hex characters of an id) "
            "— run `cogedit cache ls` to see ids"
        )
    matches = [i for i in layout.entry_ids() if i.startswith(wanted)]
    if not matches:
        raise InvalidEntryIdError(
            f"no cache entry in {layout.root} has an id starting with {wanted!r} "
            "— run `cogedit cache ls` to see ids"
        )
    if len(matches) > 1:
        shown = ", ".join(m[:12] + "…" for m in matches[:5])
        raise InvalidEntryIdError(
            f"id prefix {wanted!r} matches {len(matches)} entries ({shown}) "
            "— type more characters; run `cogedit cache ls` to see ids"
        )
    return matches[0]
