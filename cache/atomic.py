"""Crash-safe cache writes and self-verifying safetensors files.

A write goes to `.<name>.tmp-<pid>-<random>` in the target's own folder (same filesystem, so the
rename is atomic), is flushed and fsynced, then `os.replace`d over the target; the temporary file
is removed in `finally`. Readers therefore see the old file or the new one, never half of one,
whatever crashes and whoever else writes at the same time.

Every safetensors file carries `cogedit.payload_sha256` in its header metadata, so a file can be
checked on its own, without the manifest (prompt embeddings have none).

torch and safetensors are imported by the functions that read or write tensors, not here, so that
`cogedit cache ls` and `cache show` (which only read JSON) start without them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cache.errors import CacheCorruptError, CacheError, DiskFullError, ReadOnlyCacheError
from cache.faults import maybe_die
from cache.sizes import format_size

if TYPE_CHECKING:
    import torch

PAYLOAD_KEY = "cogedit.payload_sha256"
FREE_SPACE_MARGIN = 64 * 1024 * 1024
TMP_MARK = ".tmp-"

_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_READ_ONLY_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}
# A header bigger than this is damage, not data (safetensors itself caps headers at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class FileRecord:
    """What the manifest remembers about one file: whole-file sha256 and size."""

    sha256: str
    bytes: int


# ---------------------------------------------------------------------------- atomic writes


def ensure_free_space(directory: Path, nbytes: int, margin: int = FREE_SPACE_MARGIN) -> None:
    """Raise DiskFullError unless `nbytes` (+ `margin`) fit on `directory`'s disk."""
    probe = Path(directory)
    while not probe.exists() and probe.parent != probe:  # the folder may not exist yet
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # cannot tell; the write itself still turns ENOSPC into DiskFullError
    if free < nbytes + margin:
        raise DiskFullError(
            f"not enough disk space in {directory}: need {format_size(nbytes)} "
            f"(+{format_size(margin)} margin), {format_size(free)} free "
            "— free some space, run `cogedit cache gc --max-size SIZE`, or pass --cache-dir on a bigger disk"
        )


def _temp_path(path: Path) -> Path:
    return path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def _write_fully(fd: int, data: bytes | memoryview) -> None:
    # os.write may write less than asked (Linux caps one call near 2 GiB).
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Not possible on Windows, refused by some filesystems:
    # the file's data is already synced, so skipping is safe.
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _translate_os_error(exc: OSError, path: Path) -> Exception:
    if exc.errno in _FULL_ERRNOS:
        return DiskFullError(
            f"disk full while writing {path} "
            "— free some space, run `cogedit cache gc --max-size SIZE`, or pass --cache-dir on a bigger disk"
        )
    if exc.errno == errno.EFBIG:
        return DiskFullError(
            f"{path} is larger than this filesystem or the process's file-size limit (ulimit -f) allows "
            "— raise the limit, or pass --cache-dir on another filesystem"
        )
    if exc.errno in _READ_ONLY_ERRNOS:
        return ReadOnlyCacheError(
            f"cannot write {path}: {exc.strerror or exc} "
            "— pass --cache-dir to a writable folder or set COGEDIT_CACHE"
        )
    return exc


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` so that readers see either the old file or all of the new one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _translate_os_error(exc, path) from exc
    ensure_free_space(path.parent, len(memoryview(data)))
    tmp = _temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            half = len(memoryview(data)) // 2
            _write_fully(fd, memoryview(data)[:half])
            maybe_die(f"write:{path.name}")  # crash tests: die with half a file written
            _write_fully(fd, memoryview(data)[half:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        translated = _translate_os_error(exc, path)
        if translated is exc:
            raise
        raise translated from exc
    finally:
        # Gone already after a successful replace; otherwise this removes the partial file.
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            pass  # `cogedit cache verify` reports leftover .tmp- files
    _fsync_dir(path.parent)


def remove_temp_files(directory: Path) -> None:
    """Delete the temporary files of writes that crashed, anywhere under `directory`.

    Only for the holder of the entry's lock: nobody else writes there meanwhile.
    """
    for leftover in Path(directory).rglob(f".*{TMP_MARK}*"):
        try:
            leftover.unlink()
        except OSError:
            pass  # `cogedit cache verify` still reports it


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------- safetensors


def payload_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over each tensor in sorted-name order: `name\\0dtype\\0shape\\0` then its raw bytes.

    Names, dtypes and shapes are included so header damage that still parses (a swapped shape)
    is caught too, not only damaged data.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        shape = ",".join(str(s) for s in t.shape)
        digest.update(f"{name}\0{t.dtype}\0{shape}\0".encode())
        # A uint8 view gives the raw bytes of any dtype (numpy has no bfloat16/float8).
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> FileRecord:
    """Save `tensors` as a self-verifying safetensors file, atomically; return its FileRecord."""
    import safetensors.torch

    meta = dict(metadata or {})
    if PAYLOAD_KEY in meta:
        raise ValueError(f"metadata key {PAYLOAD_KEY!r} is reserved: save_tensors sets it")
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    meta[PAYLOAD_KEY] = payload_digest(cpu)
    # Check before serializing: building the bytes costs as much memory as the file is big.
    ensure_free_space(Path(path).parent, sum(t.numel() * t.element_size() for t in cpu.values()))
    data = safetensors.torch.save(cpu, metadata=meta)
    write_bytes_atomic(Path(path), data)
    return FileRecord(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def corrupt_error(path: Path, problem: str) -> CacheCorruptError:
    """A CacheCorruptError naming the file and how to recover, by where the file lives."""
    path = Path(path)
    for parent in path.parents:
        if parent.parent.name == "inversions":
            from cache.layout import validate_entry_id  # local: layout imports nothing from here

            try:
                entry_id = validate_entry_id(parent.name)
            except CacheError:
                break
            rel = path.relative_to(parent).as_posix()
            return CacheCorruptError(
                f"cache entry {entry_id} is corrupt: {rel} {problem} "
                f"— run `cogedit cache rm {entry_id}`, then invert again to recompute it"
            )
    if path.parent.parent.name == "prompts":
        return CacheCorruptError(
            f"cached prompt embedding {path} {problem} — delete it; the next run recomputes it"
        )
    return CacheCorruptError(f"cache file {path} {problem} — delete it and run again to recompute it")


def _header_metadata(head: bytes, path: Path, file_size: int) -> dict[str, str]:
    # safetensors layout: u64 little-endian header length, then that many bytes of JSON.
    if len(head) < 8:
        raise corrupt_error(path, "is truncated (no safetensors header)")
    n = int.from_bytes(head[:8], "little")
    if n > _MAX_HEADER or 8 + n > file_size:
        raise corrupt_error(path, "is truncated or has a damaged safetensors header")
    try:
        header = json.loads(head[8 : 8 + n])
    except ValueError:
        raise corrupt_error(path, "has a damaged safetensors header") from None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise corrupt_error(path, "has a damaged safetensors header")
    return meta


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata strings of a safetensors file's header (reads only the header)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) == 8:
                n = int.from_bytes(head, "little")
                head += f.read(min(n, _MAX_HEADER + 1))
    except FileNotFoundError:
        raise corrupt_error(path, "is missing") from None
    return _header_metadata(head, path, size)


def check_tensor_bytes(
    data: bytes, path: Path, expected: FileRecord | None = None
) -> dict[str, torch.Tensor]:
    """Parse and verify a safetensors file already read into memory (CacheCorruptError if bad)."""
    import safetensors.torch

    path = Path(path)
    if expected is not None:
        if len(data) != expected.bytes:
            raise corrupt_error(path, f"is {len(data)} bytes but the manifest records {expected.bytes}")
        if hashlib.sha256(data).hexdigest() != expected.sha256:
            raise corrupt_error(path, "fails its checksum")
    meta = _header_metadata(data, path, len(data))
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise corrupt_error(path, f"cannot be parsed ({exc})") from None
    if expected is not None:
        return tensors  # the whole-file checksum above already covers every payload byte
    recorded = meta.get(PAYLOAD_KEY)
    if recorded is None:
        raise corrupt_error(path, f"has no {PAYLOAD_KEY} (not written by cogedit, or its header is damaged)")
    if payload_digest(tensors) != recorded:
        raise corrupt_error(path, "fails its checksum")
    return tensors


def load_tensors(
    path: Path, expected: FileRecord | None = None, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Load a file written by save_tensors, verified; CacheCorruptError on any damage.

    The bytes are read once, so the checks and the tensors are of the same snapshot even if
    another process replaces the file meanwhile. A missing file is an error here: callers for
    whom the file is optional check `path.exists()` first.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise corrupt_error(path, "is missing") from None
    except OSError as exc:
        raise CacheError(f"cannot read cache file {path}: {exc.strerror or exc} — check its permissions") from exc
    tensors = check_tensor_bytes(data, path, expected)
    if device != "cpu":
        tensors = {name: t.to(device) for name, t in tensors.items()}
    return tensors


def _st_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors header's "dtype" name, for load_tensors_pinned."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    }[name]


def _read_into(path: Path, expected: FileRecord, pin: bool) -> torch.Tensor:
    import torch

    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != expected.bytes:
                raise corrupt_error(path, f"is {size} bytes but the manifest records {expected.bytes}")
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
            view, got = memoryview(buf.numpy()), 0
            while got < size and (n := f.readinto(view[got:])):  # one read() returns at most ~2 GiB
                got += n
    except FileNotFoundError:
        raise corrupt_error(path, "is missing") from None
    except OSError as exc:
        raise CacheError(f"cannot read cache file {path}: {exc.strerror or exc} — check its permissions") from exc
    if got != size:
        raise corrupt_error(path, "was truncated while being read")
    return buf


def load_tensors_pinned(path: Path, expected: FileRecord | None, pin: bool = True) -> dict[str, torch.Tensor]:
    """load_tensors for big files, with one copy: the file is read into one buffer (pinned when
    `pin`, so host-to-device copies from it are asynchronous) and the tensors are views of it.

    Written by hand because safetensors only loads into memory it allocates itself, and pinning
    after that is a second pass over every byte. Needs the manifest's record: its whole-file
    checksum is the check, and it covers the header parsed here as well as the payload.
    """
    path = Path(path)
    if expected is None:
        raise corrupt_error(path, "is not recorded in the manifest")
    buf = _read_into(path, expected, pin)
    raw = buf.numpy()
    if hashlib.sha256(raw).hexdigest() != expected.sha256:  # hashlib releases the GIL: readers run in parallel
        raise corrupt_error(path, "fails its checksum")
    n = int.from_bytes(raw[:8].tobytes(), "little")
    _header_metadata(raw[: 8 + min(n, _MAX_HEADER + 1)].tobytes(), path, len(raw))
    try:
        header = json.loads(raw[8 : 8 + n].tobytes())
        header.pop("__metadata__", None)
        # safetensors pads the header to 8 bytes and orders tensors by alignment, so the views are aligned.
        return {
            name: buf[8 + n + a : 8 + n + b].view(_st_dtype(info["dtype"])).view(info["shape"])
            for name, info in header.items()
            for a, b in [info["data_offsets"]]
        }
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise corrupt_error(path, f"cannot be parsed ({exc})") from None
