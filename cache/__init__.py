"""cogedit's on-disk cache: layout, keys, manifests, atomic safetensors writes, locks, gc, verify."""

from cache.atomic import (
    FileRecord,
    ensure_free_space,
    load_tensors,
    read_metadata,
    save_tensors,
    write_bytes_atomic,
    write_json_atomic,
)
from cache.errors import (
    CacheBusyError,
    CacheCorruptError,
    CacheError,
    CacheFormatError,
    DiskFullError,
    InvalidEntryIdError,
    ReadOnlyCacheError,
)
from cache.keys import sha256_file, stable_hash
from cache.layout import CacheLayout, EntryPaths, cache_root, resolve_entry_id, validate_entry_id
from cache.lock import entry_lock
from cache.manifest import (
    FORMAT_VERSION,
    file_record,
    new_manifest,
    read_manifest,
    record_file,
    touch,
    write_manifest,
)
from cache.sizes import format_size, parse_size
from cache.store import EntryInfo, Problem, entry_info, gc, list_entries, remove_entry, verify

__all__ = [
    "FORMAT_VERSION",
    "CacheBusyError",
    "CacheCorruptError",
    "CacheError",
    "CacheFormatError",
    "CacheLayout",
    "DiskFullError",
    "EntryInfo",
    "EntryPaths",
    "FileRecord",
    "InvalidEntryIdError",
    "Problem",
    "ReadOnlyCacheError",
    "cache_root",
    "ensure_free_space",
    "entry_info",
    "entry_lock",
    "file_record",
    "format_size",
    "gc",
    "list_entries",
    "load_tensors",
    "new_manifest",
    "parse_size",
    "read_manifest",
    "read_metadata",
    "record_file",
    "remove_entry",
    "resolve_entry_id",
    "save_tensors",
    "sha256_file",
    "stable_hash",
    "touch",
    "validate_entry_id",
    "verify",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_manifest",
]
