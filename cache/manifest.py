"""The manifest: one JSON dict per entry, written last and atomically.

    {
      "format_version": 1,
      "id": "<entry id>", "kind": "inversion",
      "created": "2025-01-31T12:00:00.000000+00:00", "last_used": "...",   (ISO-8601, UTC)
      "settings": {...},          everything hashed into the id (filled by the engine)
      "summary": {...},           facts for `cache ls/show` (frames, sizes, timings...)
      "files": {"trajectory/step_0000.safetensors": {"sha256": "...", "bytes": 123}, ...},
      "stages": {...},            per-stage status, so an interrupted inversion resumes
      "complete": false
    }

An unreadable manifest is logged and treated as a miss (the entry is recomputed), as
huggingface_hub does with its metadata; only a manifest from a newer cogedit is an error,
because recomputing would overwrite an entry that cogedit can still use.
"""

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from cache.atomic import FileRecord, write_json_atomic
from cache.errors import CacheError, CacheFormatError

FORMAT_VERSION = 1

logger = logging.getLogger("cogedit.cache")


def utc_now() -> str:
    """The current time as ISO-8601 UTC, the format of `created` and `last_used`."""
    return datetime.now(timezone.utc).isoformat()


def parse_time(text: Any) -> datetime | None:
    """`created`/`last_used` back as an aware datetime; None if absent or unreadable."""
    if not isinstance(text, str):
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def new_manifest(entry_id: str, kind: str, settings: dict, summary: dict) -> dict:
    """A fresh, incomplete manifest."""
    now = utc_now()
    return {
        "format_version": FORMAT_VERSION,
        "id": entry_id,
        "kind": kind,
        "created": now,
        "last_used": now,
        "settings": settings,
        "summary": summary,
        "files": {},
        "stages": {},
        "complete": False,
    }


def check_format(manifest: dict, path: Path) -> None:
    """CacheFormatError if `manifest` comes from a newer cogedit than this one."""
    version = manifest.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise CacheFormatError(
            f"{path} was written by a newer cogedit (format {version}; this one reads up to "
            f"{FORMAT_VERSION}) — upgrade cogedit or use another --cache-dir"
        )


def read_manifest(path: Path) -> dict | None:
    """The manifest at `path`; None if missing or unreadable (a miss); CacheFormatError if too new."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("ignoring unreadable cache manifest %s (%s); the entry will be recomputed", path, exc)
        return None
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        logger.warning("ignoring corrupt cache manifest %s (%s); the entry will be recomputed", path, exc)
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format_version"), int):
        logger.warning("ignoring cache manifest %s: not a cogedit manifest; the entry will be recomputed", path)
        return None
    check_format(manifest, path)
    return manifest


def write_manifest(path: Path, manifest: dict) -> None:
    """Write the manifest atomically (readers see the old one or the new one)."""
    write_json_atomic(Path(path), manifest)


def check_rel_name(rel_name: str) -> str:
    """`rel_name` if it is a plain relative posix path inside an entry, else ValueError."""
    p = PurePosixPath(rel_name)
    if not rel_name or p.is_absolute() or ".." in p.parts or "\\" in rel_name or str(p) != rel_name:
        raise ValueError(f"manifest file names are plain relative posix paths inside the entry, got {rel_name!r}")
    return rel_name


def record_file(manifest: dict, rel_name: str, record: FileRecord) -> None:
    """Remember a written file's checksum and size under its path relative to the entry."""
    manifest.setdefault("files", {})[check_rel_name(rel_name)] = {"sha256": record.sha256, "bytes": record.bytes}


def file_record(manifest: dict, rel_name: str) -> FileRecord | None:
    """The FileRecord the manifest holds for `rel_name` (for `load_tensors(expected=...)`), or None."""
    entry = manifest.get("files", {}).get(rel_name)
    if not isinstance(entry, dict):
        return None
    sha, size = entry.get("sha256"), entry.get("bytes")
    if not isinstance(sha, str) or not isinstance(size, int):
        return None
    return FileRecord(sha256=sha, bytes=size)


def touch(path: Path) -> None:
    """Set `last_used` to now, best effort: a read-only cache must stay usable for reading.

    Only complete manifests are touched: an incomplete one belongs to a running inversion, which
    rewrites it itself. The file is re-checked just before the rewrite so a manifest replaced
    meanwhile is not overwritten with the older content.
    """
    path = Path(path)
    try:
        before = os.stat(path)
        manifest = read_manifest(path)
        if manifest is None or manifest.get("complete") is not True:
            return
        manifest["last_used"] = utc_now()
        after = os.stat(path)
        if (after.st_ino, after.st_mtime_ns, after.st_size) != (before.st_ino, before.st_mtime_ns, before.st_size):
            return  # someone else wrote it meanwhile; their last_used is recent enough
        write_manifest(path, manifest)
    except (OSError, CacheError) as exc:
        # ReadOnlyCacheError/DiskFullError/CacheFormatError are CacheErrors: none should fail a read.
        logger.debug("could not update last_used in %s: %s", path, exc)
