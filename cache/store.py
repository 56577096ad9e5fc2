"""Cache maintenance behind `cogedit cache ls/show/rm/gc/verify`."""

import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cache.atomic import TMP_MARK, FileRecord, check_tensor_bytes, corrupt_error
from cache.errors import (
    CacheBusyError,
    CacheCorruptError,
    CacheFormatError,
    InvalidEntryIdError,
    ReadOnlyCacheError,
)
from cache.keys import sha256_file
from cache.layout import CacheLayout, EntryPaths, validate_entry_id
from cache.lock import entry_lock
from cache.manifest import check_rel_name, file_record, parse_time, read_manifest
from cache.sizes import format_size, parse_size

__all__ = [
    "EntryInfo",
    "Problem",
    "entry_details",
    "entry_info",
    "settings_flags",
    "format_size",
    "gc",
    "list_entries",
    "loose_size",
    "parse_size",
    "remove_entry",
    "total_size",
    "verify",
]

logger = logging.getLogger("cogedit.cache")

# remove_entry waits this long for a running inversion before giving up with CacheBusyError.
REMOVE_TIMEOUT = 1.0


@dataclass(frozen=True)
class EntryInfo:
    """One cache entry as `cache ls/show` print it. For gc's removed prompt files, kind is
    "prompt", id the prompt key, dir the file, and summary holds its model_key."""

    id: str
    kind: str | None
    complete: bool
    created: str | None
    last_used: str | None
    size_bytes: int
    summary: dict = field(hash=False)
    manifest_ok: bool
    dir: Path
    problem: str | None = None  # why manifest_ok is False, with the fix
    flags: dict = field(default_factory=dict, hash=False)  # its settings as flags (settings_flags)

    @property
    def inversion(self) -> str:
        """How it was inverted: "ddim" or "fixed-point x1" ("" when the manifest does not say)."""
        method = self.flags.get("--inversion", "")
        return f"{method} x{self.flags['--inversion-iters']}" if "--inversion-iters" in self.flags else method

    @property
    def state(self) -> str:
        """complete, partial (an inversion still running or interrupted: it resumes) or broken."""
        return "complete" if self.complete else ("partial" if self.manifest_ok else "broken")


@dataclass(frozen=True)
class Problem:
    """One thing `verify` found wrong; `file` is relative to the entry (or to prompts/)."""

    entry_id: str
    file: str
    reason: str


# ---------------------------------------------------------------------------- listing


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass  # removed while we walked (e.g. a temp file renamed into place)
    return total


def _no_entry(layout: CacheLayout, entry_id: str) -> InvalidEntryIdError:
    return InvalidEntryIdError(
        f"no cache entry {entry_id} in {layout.root} — run `cogedit cache ls` to see ids"
    )


def _info(paths: EntryPaths) -> EntryInfo:
    manifest: dict | None
    problem = None
    try:
        manifest = read_manifest(paths.manifest)
        ok = manifest is not None
        if manifest is None:
            state = "is missing" if not paths.manifest.exists() else "is unreadable"
            problem = (
                f"manifest.json {state} (an interrupted or damaged entry) "
                f"— run `cogedit cache rm {paths.id}`"
            )
    except CacheFormatError as exc:
        # Still show what the newer cogedit recorded, so ls/gc treat it like any entry.
        ok, problem = False, str(exc)
        try:
            manifest = json.loads(paths.manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = None
    m = manifest if isinstance(manifest, dict) else {}
    summary = m.get("summary")
    return EntryInfo(
        id=paths.id,
        kind=m.get("kind") if isinstance(m.get("kind"), str) else None,
        complete=m.get("complete") is True,
        created=m.get("created") if isinstance(m.get("created"), str) else None,
        last_used=m.get("last_used") if isinstance(m.get("last_used"), str) else None,
        size_bytes=_tree_size(paths.dir),
        summary=summary if isinstance(summary, dict) else {},
        manifest_ok=ok,
        dir=paths.dir,
        problem=problem,
        flags=settings_flags(m.get("settings") if isinstance(m.get("settings"), dict) else {})[0],
    )


def _last_used(info: EntryInfo) -> datetime:
    """When the entry was last used; the folder's mtime when the manifest does not say."""
    t = parse_time(info.last_used)
    if t is not None:
        return t
    try:
        return datetime.fromtimestamp(info.dir.stat().st_mtime, timezone.utc)
    except OSError:
        return datetime.min.replace(tzinfo=timezone.utc)


def list_entries(layout: CacheLayout) -> list[EntryInfo]:
    """Every entry folder, most recently used first; broken ones too, so they can be removed."""
    infos = [_info(layout.entry(i)) for i in layout.entry_ids()]
    return sorted(infos, key=_last_used, reverse=True)


def entry_info(layout: CacheLayout, entry_id: str) -> EntryInfo:
    """One entry's EntryInfo; InvalidEntryIdError if there is no such entry."""
    paths = layout.entry(entry_id)
    if not paths.dir.is_dir():
        raise _no_entry(layout, paths.id)
    return _info(paths)


_DTYPE_FLAGS = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}


def settings_flags(settings: dict) -> tuple[dict, list[str]]:
    """An inversion's settings as the flags that made them, one value each (`--dtype fp32`, not
    'torch.float32'), and a line for each value its id records otherwise, saying why."""
    frames, invert = settings.get("frames", {}), settings.get("invert", {})
    identity = settings.get("identity", {})
    plan = identity.get("weights")  # 8/4-bit weights change the result; offloading does not
    flags = {
        "--model": settings.get("model", {}).get("source"),
        "--dtype": _DTYPE_FLAGS.get(settings.get("dtype"), settings.get("dtype")),
        "--plan": plan,
        "--compile": True if identity.get("compiled") else None,
        "--fp8": True if identity.get("fp8") else None,
        "--attention": identity.get("attention"),
        "--frames": "all" if "max_frames" in frames and frames["max_frames"] is None else frames.get("max_frames"),  # None recorded: every frame
        "--fps": frames.get("fps"),
        "--window-overlap": invert.get("overlap") if invert.get("window") else None,
        "--skip-start": frames.get("skip_start") or None,
        "--skip-end": frames.get("skip_end") or None,
        "--stride": frames.get("stride"),
        "--height": frames.get("height"),
        "--width": frames.get("width"),
        "--fit": frames.get("fit"),
        "--steps": invert.get("steps"),
        "--source-prompt": invert.get("source_prompt"),
        "--negative-prompt": invert.get("negative_prompt") or None,
        "--guidance": invert.get("guidance"),
        "--inversion": invert.get("method", "ddim"),
        "--inversion-iters": invert.get("iters") or None,
    }
    notes = []
    hashed = identity.get("invert", {}).get("guidance")
    if hashed is not None and hashed != invert.get("guidance"):
        notes.append(f"the id records guidance {hashed}: with the source prompt equal to the negative prompt, guidance changes nothing")
    indices = identity.get("frames", {}).get("indices")
    if indices:
        shown = ", ".join(map(str, indices)) if len(indices) <= 4 else f"{', '.join(map(str, indices[:3]))} … {indices[-1]}"
        notes.append(f"{len(indices)} frames used: {shown}")
    return {k: v for k, v in flags.items() if v is not None}, notes


def entry_details(layout: CacheLayout, entry_id: str) -> dict:
    """What `cache show` prints about one entry, as JSON-ready data: state, size and times, the
    manifest's summary, settings and stages, each file with its size and sha256, and the stored
    attention. Sections a broken manifest lacks are empty."""
    info = entry_info(layout, entry_id)
    try:
        manifest = read_manifest(layout.entry(info.id).manifest) or {}
    except CacheFormatError:
        manifest = {}  # a newer cogedit's: info.problem says so
    files = manifest.get("files")
    records = [(rel, file_record(manifest, rel)) for rel in sorted(files)] if isinstance(files, dict) else []
    flags, notes = settings_flags(manifest.get("settings", {}))
    return {
        "id": info.id,
        "state": info.state,
        "problem": info.problem,
        "dir": str(info.dir),
        "size": info.size_bytes,
        "created": info.created,
        "last_used": info.last_used,
        "summary": info.summary,
        "settings": manifest.get("settings", {}),
        "flags": flags,
        "notes": notes,
        "stages": manifest.get("stages", {}),
        "files": [{"file": rel, "bytes": r.bytes, "sha256": r.sha256} for rel, r in records if r is not None],
        "attention": manifest.get("attention", {}),
    }


# ---------------------------------------------------------------------------- removal


def remove_entry(layout: CacheLayout, entry_id: str, timeout: float = REMOVE_TIMEOUT) -> int:
    """Delete an entry; return the bytes freed. CacheBusyError if an inversion holds its lock.

    The folder is first renamed into trash/ (atomic), then deleted, so a crash midway never
    leaves half an entry under inversions/ that could pass for a whole one.
    """
    paths = layout.entry(entry_id)
    if not paths.dir.is_dir():
        raise _no_entry(layout, paths.id)
    with entry_lock(paths, timeout=timeout):
        if not paths.dir.is_dir():  # another rm won the race
            raise _no_entry(layout, paths.id)
        size = _tree_size(paths.dir)
        doomed = layout.trash_dir / f"{paths.id}-{secrets.token_hex(4)}"
        try:
            layout.trash_dir.mkdir(parents=True, exist_ok=True)
            os.rename(paths.dir, doomed)
        except OSError as exc:
            raise ReadOnlyCacheError(
                f"cannot remove {paths.dir}: {exc.strerror or exc} "
                "— check the cache folder's permissions, or pass --cache-dir to a writable cache"
            ) from exc
    shutil.rmtree(doomed, ignore_errors=True)  # leftovers are purged by the next gc
    return size


def _purge_trash(layout: CacheLayout) -> None:
    # Folders left by a remove that crashed mid-rmtree; nothing can be using them.
    try:
        leftovers = list(layout.trash_dir.iterdir())
    except OSError:
        return
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True)


def _lock_busy(paths: EntryPaths) -> bool:
    try:
        with entry_lock(paths, timeout=0):
            return False
    except CacheBusyError:
        return True
    except ReadOnlyCacheError:
        return False  # nobody can be writing a cache we cannot even lock


def _loose_files(layout: CacheLayout, prompts_only: bool = False) -> list[tuple[Path, os.stat_result]]:
    """Prompt embeddings and --compile's kernels: single files outside any entry, oldest first."""
    files = []
    found = list(layout.prompts_dir.glob("*/*")) + ([] if prompts_only else list(layout.compile_dir.glob("*.bin")))
    for path in found:
        try:
            st = path.stat()
        except OSError:
            continue
        if path.is_file():
            files.append((path, st))
    return sorted(files, key=lambda f: f[1].st_mtime)


def _loose_info(path: Path, st: os.stat_result) -> EntryInfo:
    prompt = path.suffix == ".safetensors"
    return EntryInfo(
        id=path.name.removesuffix(path.suffix),
        kind="prompt" if prompt else "compiled kernels",
        complete=True,
        created=None,
        last_used=datetime.fromtimestamp(st.st_mtime, timezone.utc).isoformat(),
        size_bytes=st.st_size,
        summary={"model_key": path.parent.name} if prompt else {},
        manifest_ok=True,
        dir=path,
    )


def loose_size(layout: CacheLayout) -> int:
    """The prompt embeddings and compiled kernels: the cache outside its entries."""
    return sum(st.st_size for _, st in _loose_files(layout))


def total_size(layout: CacheLayout) -> int:
    """What gc weighs: every entry (with its edits), the prompt embeddings and compiled kernels."""
    return sum(e.size_bytes for e in list_entries(layout)) + loose_size(layout)


def gc(layout: CacheLayout, max_bytes: int, dry_run: bool = False) -> list[EntryInfo]:
    """Remove least-recently-used entries, then the oldest prompt embeddings and compiled kernels,
    until the cache (inversions + prompts + kernels) is at most `max_bytes`. Return what was (or, dry run, would be) removed.

    Order: incomplete and broken entries first, then complete ones by last_used, oldest first.
    Entries whose lock is held (a running inversion) are skipped.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    if not dry_run:
        _purge_trash(layout)
    entries = list_entries(layout)
    prompts = _loose_files(layout)
    total = sum(e.size_bytes for e in entries) + sum(st.st_size for _, st in prompts)
    removed: list[EntryInfo] = []
    for info in sorted(entries, key=lambda e: (e.complete, _last_used(e))):
        if total <= max_bytes:
            return removed
        try:
            if dry_run:
                if _lock_busy(layout.entry(info.id)):
                    raise CacheBusyError(info.id)
                freed = info.size_bytes
            else:
                freed = remove_entry(layout, info.id, timeout=0)
        except CacheBusyError:
            logger.info("gc: skipping cache entry %s: in use by another process", info.id)
            continue
        except InvalidEntryIdError:
            freed = info.size_bytes  # removed by someone else meanwhile
        total -= freed
        removed.append(info)
    for path, st in prompts:
        if total <= max_bytes:
            break
        if not dry_run:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise ReadOnlyCacheError(
                    f"cannot remove {path}: {exc.strerror or exc} — check the cache folder's permissions"
                ) from exc
        total -= st.st_size
        removed.append(_loose_info(path, st))
    return removed


# ---------------------------------------------------------------------------- verify


def _check_file(path: Path, expected: FileRecord | None, is_tensor: bool) -> str | None:
    """None if the file is fine, else what is wrong with it (CacheCorruptError's message)."""
    try:
        if is_tensor:
            check_tensor_bytes(path.read_bytes(), path, expected)
        elif expected is not None:
            size = path.stat().st_size
            if size != expected.bytes:
                raise corrupt_error(path, f"is {size} bytes but the manifest records {expected.bytes}")
            if sha256_file(path) != expected.sha256:
                raise corrupt_error(path, "fails its checksum")
    except CacheCorruptError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc} — check the file's permissions"
    return None


def _leftover_reason(extra_fix: str = "") -> str:
    return f"leftover temporary file from an interrupted write — delete it (safe){extra_fix}"


def _verify_entry(paths: EntryPaths) -> list[Problem]:
    problems: list[Problem] = []
    rm = f"run `cogedit cache rm {paths.id}`"

    def report(rel: str, reason: str) -> None:
        problems.append(Problem(entry_id=paths.id, file=rel, reason=reason))

    try:
        manifest = read_manifest(paths.manifest)
    except CacheFormatError as exc:
        report("manifest.json", str(exc))
        return problems  # a newer format's files are not ours to judge
    if manifest is None:
        state = "is missing" if not paths.manifest.exists() else "is unreadable (not valid manifest JSON)"
        report("manifest.json", f"{state} — {rm}")
        manifest = {}

    checked: set[str] = set()
    files = manifest.get("files", {})
    for rel in sorted(files if isinstance(files, dict) else {}):
        try:
            check_rel_name(rel)
        except ValueError:
            report(rel, f"the manifest lists a path outside the entry — {rm}")
            continue
        record = file_record(manifest, rel)
        path = paths.dir / rel
        checked.add(rel)
        if record is None:
            report(rel, f"its manifest record is damaged — {rm}")
        elif not path.is_file():
            report(rel, f"is listed in the manifest but missing — {rm}, then invert again")
        elif (reason := _check_file(path, record, rel.endswith(".safetensors"))) is not None:
            report(rel, reason)

    # Files the manifest does not (yet) list: temp leftovers, and safetensors checked by their own digest.
    busy = _lock_busy(paths)
    for path in sorted(p for p in paths.dir.rglob("*") if p.is_file()):
        rel = paths.relative(path)
        if TMP_MARK in path.name:
            if not busy:  # a running inversion's temp file is not a leftover
                report(rel, _leftover_reason(f" or {rm}"))
        elif rel not in checked and path.name.endswith(".safetensors"):
            if (reason := _check_file(path, None, True)) is not None:
                report(rel, reason)
    return problems


def _verify_prompts(layout: CacheLayout) -> list[Problem]:
    problems = []
    for path, _st in _loose_files(layout, prompts_only=True):
        rel = path.relative_to(layout.prompts_dir).as_posix()
        if TMP_MARK in path.name:
            problems.append(Problem("prompts", rel, _leftover_reason()))
        elif path.name.endswith(".safetensors") and (reason := _check_file(path, None, True)) is not None:
            problems.append(Problem("prompts", rel, reason))
    return problems


def verify(layout: CacheLayout, entry_ids: list[str] | None = None) -> list[Problem]:
    """Check entries (all, or `entry_ids`) and, for a full check, prompt embeddings.

    Every manifest-listed file must exist with its recorded size and sha256; every safetensors
    file must parse and match its embedded payload digest; `.tmp-` leftovers and unreadable
    manifests are reported. An empty list means the cache is sound.
    """
    if entry_ids is None:
        ids = layout.entry_ids()
    else:
        ids = [validate_entry_id(i) for i in entry_ids]
        for i in ids:
            if not layout.entry(i).dir.is_dir():
                raise _no_entry(layout, i)
    problems: list[Problem] = []
    for i in ids:
        problems.extend(_verify_entry(layout.entry(i)))
    if entry_ids is None:
        problems.extend(_verify_prompts(layout))
    return problems
