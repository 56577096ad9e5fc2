"""The on-disk cache: layout, keys, atomic writes, manifests, locks, gc, verify (CPU, fast)."""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cache.atomic
import cache.manifest
from cache.atomic import PAYLOAD_KEY, FileRecord, ensure_free_space, load_tensors, read_metadata, save_tensors, write_bytes_atomic, write_json_atomic
from cache.errors import CacheBusyError, CacheCorruptError, CacheFormatError, DiskFullError, InvalidEntryIdError, ReadOnlyCacheError
from cache.keys import sha256_file, stable_hash
from cache.layout import CacheLayout, cache_root, resolve_entry_id, validate_entry_id
from cache.lock import entry_lock
from cache.manifest import FORMAT_VERSION, file_record, new_manifest, read_manifest, record_file, touch, write_manifest
from cache.sizes import format_size, parse_size
from cache.store import entry_info, gc, list_entries, remove_entry, verify

REPO = Path(__file__).resolve().parents[1]
ID_A = "a" * 32
ID_B = "b" * 32


@pytest.fixture
def layout(tmp_path: Path) -> CacheLayout:
    lay = CacheLayout(tmp_path / "c")
    lay.ensure()
    return lay


def _files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "latent": torch.randn(3, 4, 5, generator=g).to(torch.bfloat16),
        "steps": torch.arange(6, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 7, dtype=torch.float16),
        "transposed": torch.randn(4, 3, generator=g).t(),  # not contiguous
    }


def _make_entry(
    layout: CacheLayout,
    entry_id: str,
    *,
    payload: int = 10_000,
    last_used: str | None = "2024-01-01T00:00:00+00:00",
    complete: bool = True,
    manifest: bool = True,
) -> None:
    """An entry with one step file of about `payload` bytes and (optionally) a manifest."""
    paths = layout.entry(entry_id)
    rec = save_tensors(paths.step_file(0), {"latent": torch.zeros(payload // 4)})
    if manifest:
        m = new_manifest(entry_id, "inversion", {"steps": 1}, {"video": "v.mp4"})
        record_file(m, "trajectory/step_0000.safetensors", rec)
        m["complete"] = complete
        if last_used is not None:
            m["last_used"] = last_used
        write_manifest(paths.manifest, m)


# ---------------------------------------------------------------------------- layout


def test_cache_root_prefers_argument_then_env_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("COGEDIT_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("COGEDIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "cogedit"
    assert CacheLayout.from_dir(tmp_path / "x").root == tmp_path / "x"


def test_entry_paths_and_lock_outside_entry(tmp_path):
    lay = CacheLayout(tmp_path)
    p = lay.entry(ID_A)
    assert p.dir == tmp_path / "inversions" / ID_A
    assert p.manifest == p.dir / "manifest.json"
    assert p.latents == p.dir / "latents.safetensors"
    assert p.frames == p.dir / "frames.safetensors"
    assert p.step_file(7) == p.dir / "trajectory" / "step_0007.safetensors"
    assert p.attention_dir == p.dir / "attention"
    assert p.lock == tmp_path / "locks" / f"{ID_A}.lock"
    assert p.dir not in p.lock.parents
    assert lay.prompt_file(ID_A, ID_B) == tmp_path / "prompts" / ID_A / f"{ID_B}.safetensors"
    with pytest.raises(ValueError):
        p.step_file(-1)


@pytest.mark.parametrize(
    "bad", ["../x", "ABC", "", "abc", "a" * 15, "A" * 32, "g" * 32, "a" * 65, f"../{'a' * 30}", "a" * 31 + "/"]
)
def test_invalid_ids_are_rejected(bad, tmp_path):
    with pytest.raises(InvalidEntryIdError, match="cogedit cache ls"):
        validate_entry_id(bad)
    with pytest.raises(InvalidEntryIdError):
        CacheLayout(tmp_path).entry(bad)
    with pytest.raises(InvalidEntryIdError):
        CacheLayout(tmp_path).prompt_file(ID_A, bad)


def test_valid_ids_pass():
    assert validate_entry_id("0123456789abcdef") == "0123456789abcdef"
    assert validate_entry_id("f" * 64) == "f" * 64


def test_resolve_entry_id_by_prefix(layout):
    ids = ["abcd0" + "0" * 27, "abcd1" + "1" * 27, "ffff" + "2" * 28]
    for i in ids:
        layout.entry(i).dir.mkdir(parents=True)
    (layout.entries_dir / "not-an-id").mkdir()
    assert resolve_entry_id(layout, "abcd0") == ids[0]
    assert resolve_entry_id(layout, "ABCD1") == ids[1]  # typed prefixes are case-insensitive
    assert resolve_entry_id(layout, "ffff") == ids[2]
    assert resolve_entry_id(layout, ids[2]) == ids[2]
    with pytest.raises(InvalidEntryIdError, match="matches 2 entries.*cogedit cache ls"):
        resolve_entry_id(layout, "abcd")
    with pytest.raises(InvalidEntryIdError, match="no cache entry.*cogedit cache ls"):
        resolve_entry_id(layout, "1234")
    for bad in ("abc", "../a", "zzzz", ""):
        with pytest.raises(InvalidEntryIdError, match="at least 4"):
            resolve_entry_id(layout, bad)


def test_ensure_creates_tree(tmp_path):
    lay = CacheLayout(tmp_path / "new" / "cache")
    lay.ensure()
    assert {"inversions", "prompts", "locks"} <= set(_files_in(lay.root))


_READ_ONLY_CHECK = """
import os, sys
from pathlib import Path
import pytest
from cache.errors import ReadOnlyCacheError
from cache.layout import CacheLayout
if os.geteuid() == 0:  # root writes anywhere: become nobody, so that chmod binds
    os.setgid(65534)
    os.setuid(65534)
ro = sys.argv[1]
for path in (Path(ro) / "cache", Path(ro)):
    with pytest.raises(ReadOnlyCacheError, match="--cache-dir"):
        CacheLayout(path).ensure()
"""


def test_read_only_cache_dir_chmod(tmp_path):
    # A real read-only folder, also where the suite runs as root (CI): the check runs in a child
    # that gives up root after its imports, in a folder everyone may enter.
    opened = {p: p.stat().st_mode for p in (tmp_path, *tmp_path.parents[:2]) if p.stat().st_uid == os.geteuid()}
    for path, mode in opened.items():
        path.chmod(mode | 0o005)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        done = subprocess.run([sys.executable, "-c", _READ_ONLY_CHECK, str(ro)], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        ro.chmod(0o755)
        for path, mode in opened.items():
            path.chmod(mode)


def test_read_only_cache_dir_simulated(tmp_path, monkeypatch):
    # Runs even as root: mkdir refused, then an existing folder that os.access calls read-only.
    def refuse(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(ReadOnlyCacheError, match="set COGEDIT_CACHE"):
        CacheLayout(tmp_path / "c").ensure()
    monkeypatch.undo()
    CacheLayout(tmp_path / "c").ensure()
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(ReadOnlyCacheError, match="not writable"):
        CacheLayout(tmp_path / "c").ensure()


# ---------------------------------------------------------------------------- keys


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclasses.dataclass(frozen=True)
class Settings:
    steps: int
    dtype: torch.dtype
    size: tuple[int, int]


def _base() -> dict:
    return {
        "steps": 50,
        "prompt": "",
        "cfg": 6.0,
        "video": Path("/v/a.mp4"),
        "mode": Mode.FAST,
        "invert": Settings(50, torch.bfloat16, (480, 720)),
        "layers": [0, 1, 2],
        "flag": True,
    }


def test_stable_hash_ignores_dict_order():
    a = {"x": 1, "y": {"p": [1, 2], "q": "z"}}
    b = {"y": {"q": "z", "p": [1, 2]}, "x": 1}
    assert stable_hash(a) == stable_hash(b)
    assert stable_hash(_base()) == stable_hash(dict(reversed(list(_base().items()))))


def test_stable_hash_changes_with_every_value():
    variants = []
    for key, new in [
        ("steps", 51),
        ("prompt", " "),
        ("cfg", 6.000001),
        ("video", Path("/v/b.mp4")),
        ("mode", Mode.SLOW),
        ("invert", Settings(50, torch.float16, (480, 720))),
        ("invert", Settings(50, torch.bfloat16, (720, 480))),
        ("layers", [0, 2, 1]),
        ("flag", False),
        ("flag", 1),
        ("steps", 50.0),
    ]:
        v = _base()
        v[key] = new
        variants.append(stable_hash(v))
    extra = _base()
    extra["new"] = None
    variants.append(stable_hash(extra))
    assert stable_hash(_base()) not in variants
    assert len(set(variants)) == len(variants)


def test_stable_hash_canonical_form():
    assert stable_hash({}) == hashlib.sha256(b"{}").hexdigest()[:32]
    expected = hashlib.sha256(b'{"a":[1,2],"b":"bfloat16"}').hexdigest()
    assert stable_hash({"b": "bfloat16", "a": (1, 2)}, length=64) == expected
    # Values hash like their JSON round-trip through a manifest.
    assert stable_hash({"p": Path("x/y"), "t": (1, 2)}) == stable_hash({"p": "x/y", "t": [1, 2]})
    assert stable_hash({"d": torch.bfloat16}) == stable_hash({"d": "torch.bfloat16"})
    assert stable_hash({1, 2, 3}) == stable_hash({3, 2, 1})
    assert len(stable_hash("x", length=16)) == 16
    with pytest.raises(ValueError):
        stable_hash("x", length=0)
    with pytest.raises(TypeError, match="object"):
        stable_hash({"x": object()})


def test_canonical_json_follows_every_documented_rule():
    """The conversion table of cache/keys.py, value by value: a key that changed its text would
    orphan every cache entry (or, worse, merge two)."""
    from pathlib import PurePosixPath

    from cache.keys import canonical_json

    class Color(enum.Enum):
        RED = "red"

    class Level(enum.IntEnum):
        HIGH = 3

    cases = [
        (1.5, "1.5"), (float("nan"), '"NaN"'), (float("inf"), '"Infinity"'), (float("-inf"), '"-Infinity"'),
        (Color.RED, '"red"'), (Level.HIGH, "3"), (b"\x00\xff", '"00ff"'), ("é ü", '"é ü"'),
        (torch.device("cpu"), '"cpu"'), (PurePosixPath("a/b"), '"a/b"'), ((1, [2]), "[1,[2]]"),
        ({"b", 10, "a"}, '["a","b",10]'),  # mixed types: sorted by each one's JSON text
        ({2: "a", None: 1, True: 0, 1.5: 2, Color.RED: 3, "z": 4}, '{"1.5":2,"2":"a","null":1,"red":3,"true":0,"z":4}'),
    ]
    for value, text in cases:
        assert canonical_json(value) == text, value
    with pytest.raises(TypeError, match=r"dict key \[1, 2\] is not a str, number, bool, None or enum"):
        canonical_json({(1, 2): 0})
    with pytest.raises(TypeError, match="convert it to str/int/float/bool/None, a list, a dict or a dataclass first"):
        canonical_json(object())
    assert [len(stable_hash("x", length=n)) for n in (1, 64)] == [1, 64]
    for bad in (0, 65):
        with pytest.raises(ValueError, match=r"length must be in 1..64 \(a sha256 has 64 hex characters\), got"):
            stable_hash("x", length=bad)


def test_sha256_file(tmp_path):
    data = os.urandom(100_000)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=4096) == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "d" / "f.bin"
    write_bytes_atomic(target, b"old")
    write_bytes_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    write_json_atomic(tmp_path / "d" / "m.json", {"b": 1, "a": [1]})
    assert json.loads((tmp_path / "d" / "m.json").read_text()) == {"a": [1], "b": 1}
    assert _files_in(tmp_path / "d") == ["f.bin", "m.json"]


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Without the file's fsync before the rename, a power cut can leave the new name pointing at
    a file whose data never reached the disk; without the folder's after it, the rename itself."""
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", st.st_ino, stat.S_ISDIR(st.st_mode)))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, Path(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    target = tmp_path / "f.bin"
    write_bytes_atomic(target, b"contents")
    inode, folder = target.stat().st_ino, tmp_path.stat().st_ino
    assert events == [("fsync", inode, False), ("replace", inode, target), ("fsync", folder, True)]


def test_the_fault_hook_signals_at_the_nth_call_of_its_point_only(monkeypatch):
    """The crash tests rely on it: one signal, at the named point's n-th call, in the named rank."""
    import signal

    import cache.faults as faults

    sent = []
    monkeypatch.setattr(faults, "_calls", {})
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    faults.maybe_die("write:a")  # unset: nothing
    monkeypatch.setenv(faults.KILL_AT_ENV, "write:a.bin:2")
    for point in ("write:a.bin", "write:b.bin", "step", "write:a.bin", "write:a.bin"):
        faults.maybe_die(point)
    assert sent == [(os.getpid(), signal.SIGKILL)]
    monkeypatch.setattr(faults, "_calls", {})
    monkeypatch.setenv(faults.KILL_SIGNAL_ENV, "SIGINT")
    monkeypatch.setenv(faults.KILL_RANK_ENV, "1")
    monkeypatch.setenv("RANK", "0")
    faults.maybe_die("write:a.bin"), faults.maybe_die("write:a.bin")
    monkeypatch.setenv("RANK", "1")
    faults.maybe_die("write:a.bin"), faults.maybe_die("write:a.bin")
    assert sent[1:] == [(os.getpid(), signal.SIGINT)]


def test_a_write_in_progress_lies_beside_its_target_where_verify_and_cleanup_look(layout, monkeypatch):
    """What a kill -9 mid-write leaves: a hidden temp file in the target's own folder (the rename
    is atomic only within one filesystem: across two it fails with EXDEV), which `cache verify`
    reports and the next run's cleanup removes; one left anywhere else neither would find."""
    from cache.atomic import TMP_MARK, remove_temp_files

    _make_entry(layout, ID_A)
    target = layout.entry(ID_A).step_file(1)
    seen = {}

    def at_the_kill_point(point: str) -> None:
        seen["temps"] = [p for p in layout.root.rglob("*") if TMP_MARK in p.name]
        seen["problems"] = verify(layout)

    monkeypatch.setattr(cache.atomic, "maybe_die", at_the_kill_point)
    save_tensors(target, {"latent": torch.zeros(64)})
    [temp] = seen["temps"]
    assert temp.parent == target.parent and temp.name.startswith(f".{target.name}")
    assert [(p.file, "leftover temporary file" in p.reason) for p in seen["problems"]] == [(f"trajectory/{temp.name}", True)]
    temp.write_bytes(b"half")  # the killed writer's leftover, at the same place
    remove_temp_files(layout.entry(ID_A).dir)
    assert not temp.exists() and target.is_file()


@pytest.mark.parametrize("code", sorted({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}))
def test_disk_full_during_write(tmp_path, monkeypatch, code):
    target = tmp_path / "f.bin"
    write_bytes_atomic(target, b"previous")

    def half_then_full(fd, data):
        os.write(fd, bytes(memoryview(data)[: len(data) // 2]))
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cache.atomic, "_write_fully", half_then_full)
    with pytest.raises(DiskFullError, match="gc --max-size"):
        write_bytes_atomic(target, b"x" * 1000)
    with pytest.raises(DiskFullError):
        save_tensors(tmp_path / "t.safetensors", {"a": torch.ones(100)})
    assert target.read_bytes() == b"previous"  # the old file is untouched
    assert _files_in(tmp_path) == ["f.bin"]  # no temp, no partial file


def test_other_os_errors_pass_through_and_clean_up(tmp_path, monkeypatch):
    def broken(fd, data):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(cache.atomic, "_write_fully", broken)
    with pytest.raises(OSError) as info:
        write_bytes_atomic(tmp_path / "f", b"x")
    assert info.value.errno == errno.EIO
    assert _files_in(tmp_path) == []


def test_ensure_free_space_refuses(tmp_path, monkeypatch):
    ensure_free_space(tmp_path, 1024)  # a tmp dir has 64 MiB + 1 KiB free
    with pytest.raises(DiskFullError, match="need .* free .*gc --max-size.*--cache-dir"):
        ensure_free_space(tmp_path, 10**18)
    usage = type("U", (), {"total": 10**9, "used": 10**9 - 10**6, "free": 10**6})
    monkeypatch.setattr(cache.atomic.shutil, "disk_usage", lambda p: usage)
    with pytest.raises(DiskFullError, match="976.6 KiB free"):
        ensure_free_space(tmp_path / "not" / "yet", 0)
    with pytest.raises(DiskFullError):
        save_tensors(tmp_path / "t.safetensors", {"a": torch.ones(4)})
    assert _files_in(tmp_path) == []
    ensure_free_space(tmp_path, 10, margin=0)  # fits without the margin


# ---------------------------------------------------------------------------- safetensors


def test_save_load_roundtrip(tmp_path):
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    rec = save_tensors(path, tensors, {"t": "981"})
    assert rec == FileRecord(sha256=sha256_file(path), bytes=path.stat().st_size)
    loaded = load_tensors(path, rec)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    meta = read_metadata(path)
    assert meta["t"] == "981" and len(meta[PAYLOAD_KEY]) == 64
    assert _files_in(tmp_path) == ["x.safetensors"]
    with pytest.raises(ValueError, match="reserved"):
        save_tensors(path, tensors, {PAYLOAD_KEY: "x"})


def _data_offset(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_flipped_bit_is_corrupt(layout):
    paths = layout.entry(ID_A)
    path = paths.step_file(7)
    rec = save_tensors(path, {"latent": torch.randn(3, 4)})
    data = bytearray(path.read_bytes())
    data[_data_offset(path) + 5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="fails its checksum") as info:
        load_tensors(path)  # embedded digest, no manifest needed
    msg = str(info.value)
    assert f"cache entry {ID_A} is corrupt: trajectory/step_0007.safetensors" in msg
    assert f"cogedit cache rm {ID_A}" in msg
    with pytest.raises(CacheCorruptError, match="fails its checksum"):
        load_tensors(path, rec)


def test_swapped_shape_in_header_is_corrupt(tmp_path):
    path = tmp_path / "x.safetensors"
    save_tensors(path, {"a": torch.randn(2, 3)})
    data = path.read_bytes()
    assert b"[2,3]" in data
    path.write_bytes(data.replace(b"[2,3]", b"[3,2]"))  # still parses: only the digest can tell
    with pytest.raises(CacheCorruptError, match="fails its checksum"):
        load_tensors(path)


@pytest.mark.parametrize("keep", [0, 4, 8, 20, -1])
def test_truncated_file_is_corrupt(tmp_path, keep):
    path = tmp_path / "x.safetensors"
    rec = save_tensors(path, {"a": torch.randn(16)})
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CacheCorruptError, match="x.safetensors"):
        load_tensors(path)
    with pytest.raises(CacheCorruptError, match=f"manifest records {rec.bytes}"):
        load_tensors(path, rec)


def test_pinned_load_gives_views_of_one_buffer_and_checks_the_record(tmp_path):
    from cache.atomic import load_tensors_pinned

    tensors = {**_tensors(), "fp8": torch.randn(5, 3).to(torch.float8_e4m3fn), "scale": torch.ones(1)}
    path = tmp_path / "x.safetensors"
    rec = save_tensors(path, tensors)
    loaded = load_tensors_pinned(path, rec, pin=False)  # no CUDA here: the same code, unpinned
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name].float(), t.float()), name
    assert len({t.untyped_storage().data_ptr() for t in loaded.values()}) == 1, "one read, one buffer"
    with pytest.raises(CacheCorruptError, match="not recorded in the manifest"):
        load_tensors_pinned(path, None, pin=False)
    data = bytearray(path.read_bytes())
    data[_data_offset(path) + 5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="fails its checksum"):
        load_tensors_pinned(path, rec, pin=False)
    path.write_bytes(bytes(data[:-3]))
    with pytest.raises(CacheCorruptError, match=f"manifest records {rec.bytes}"):
        load_tensors_pinned(path, rec, pin=False)
    path.unlink()
    with pytest.raises(CacheCorruptError, match="is missing"):
        load_tensors_pinned(path, rec, pin=False)


def test_every_safetensors_dtype_loads_pinned(tmp_path):
    from cache.atomic import load_tensors_pinned

    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
              torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
    tensors = {str(d): torch.arange(6).reshape(2, 3).to(d) for d in dtypes}
    rec = save_tensors(tmp_path / "x.safetensors", tensors)
    loaded = load_tensors_pinned(tmp_path / "x.safetensors", rec, pin=False)
    assert {k: (v.dtype, v.float().tolist()) for k, v in loaded.items()} == {k: (v.dtype, v.float().tolist()) for k, v in tensors.items()}


def _corrupt_message(path: Path) -> str:
    with pytest.raises(CacheCorruptError) as err:
        read_metadata(path)
    return str(err.value)


def test_each_kind_of_header_damage_is_named(tmp_path):
    """The message says what is wrong with which file and what to do, whatever the damage."""
    path = tmp_path / "x.safetensors"
    fix = "— delete it and run again to recompute it"

    def header(n: int, body: bytes) -> bytes:
        return n.to_bytes(8, "little") + body

    cases = {
        b"1234567": "is truncated (no safetensors header)",
        header(0, b""): "has a damaged safetensors header",  # 8 bytes: a header length, then no JSON
        header(10**9, b"{}"): "is truncated or has a damaged safetensors header",
        header(3, b"{}"): "is truncated or has a damaged safetensors header",  # one byte short
        header(2, b"[1"): "has a damaged safetensors header",
        header(2, b"[]"): "has a damaged safetensors header",  # JSON, not an object
        header(24, b'{"__metadata__":{"a":1}}'): "has a damaged safetensors header",
    }
    for data, problem in cases.items():
        path.write_bytes(data)
        assert _corrupt_message(path) == f"cache file {path} {problem} {fix}", data
    ok = json.dumps({"__metadata__": {"k": "v"}}).encode()
    path.write_bytes(header(len(ok), ok))  # the header ends exactly at the end of the file
    assert read_metadata(path) == {"k": "v"}


def test_json_is_written_indented_sorted_and_unescaped(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"b": "é", "a": [1]})
    assert (tmp_path / "m.json").read_bytes() == '{\n  "a": [\n    1\n  ],\n  "b": "é"\n}\n'.encode()


def test_written_files_get_the_usual_permissions_and_name_their_kill_point(tmp_path, monkeypatch):
    points = []
    monkeypatch.setattr(cache.atomic, "maybe_die", points.append)
    umask = os.umask(0o022)
    try:
        write_bytes_atomic(tmp_path / "f.bin", b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o644 and points == ["write:f.bin"]


@pytest.mark.parametrize(
    ("code", "problem"),
    [
        (errno.ENOSPC, "disk full while writing {path} — free some space, run `cogedit cache gc --max-size SIZE`, or pass --cache-dir on a bigger disk"),
        (errno.EFBIG, "{path} is larger than this filesystem or the process's file-size limit (ulimit -f) allows — raise the limit, or pass --cache-dir on another filesystem"),
        (errno.EROFS, "cannot write {path}: Read-only file system — pass --cache-dir to a writable folder or set COGEDIT_CACHE"),
    ],
)
def test_a_failed_folder_or_file_write_says_what_to_do(tmp_path, monkeypatch, code, problem):
    target = tmp_path / "sub" / "f.bin"

    def fails(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    for where in ("mkdir", "write"):
        with monkeypatch.context() as m:
            m.setattr(Path, "mkdir", fails) if where == "mkdir" else m.setattr(cache.atomic, "_write_fully", fails)
            with pytest.raises((DiskFullError, ReadOnlyCacheError)) as err:
                write_bytes_atomic(target, b"x")
        assert str(err.value) == problem.format(path=target), where


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CacheCorruptError, match="is missing"):
        load_tensors(tmp_path / "nope.safetensors")
    with pytest.raises(CacheCorruptError, match="is missing"):
        read_metadata(tmp_path / "nope.safetensors")
    import safetensors.torch

    safetensors.torch.save_file({"a": torch.ones(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CacheCorruptError, match=f"has no {PAYLOAD_KEY}"):
        load_tensors(tmp_path / "foreign.safetensors")


def test_an_inversions_settings_read_back_as_the_flags_that_made_them():
    """`cache show` and `cache ls` print these: every flag, one value each, in the units typed."""
    from cache.store import settings_flags

    settings = {
        "model": {"source": "/m/CogVideoX-5b"}, "dtype": "torch.float16",
        "frames": {"max_frames": 17, "skip_start": 2, "skip_end": 3, "stride": 2, "height": 96, "width": 160, "fit": "crop"},
        "invert": {"steps": 4, "source_prompt": "a rabbit", "negative_prompt": "blurry", "guidance": 6.0, "method": "fixed-point", "iters": 2},
        "identity": {"weights": "nf4", "compiled": True, "fp8": True, "invert": {"guidance": 6.0}, "frames": {"indices": [0, 2, 4, 6, 8]}},
    }
    flags, notes = settings_flags(settings)
    assert flags == {
        "--model": "/m/CogVideoX-5b", "--dtype": "fp16", "--plan": "nf4", "--compile": True, "--fp8": True, "--frames": 17, "--skip-start": 2, "--skip-end": 3,
        "--stride": 2, "--height": 96, "--width": 160, "--fit": "crop", "--steps": 4, "--source-prompt": "a rabbit", "--negative-prompt": "blurry",
        "--guidance": 6.0, "--inversion": "fixed-point", "--inversion-iters": 2,
    }
    assert notes == ["5 frames used: 0, 2, 4 … 8"]
    plain = {
        "dtype": "torch.bfloat16", "frames": {"max_frames": 9, "skip_start": 0, "skip_end": 0, "stride": None}, "invert": {"steps": 4, "negative_prompt": "", "guidance": 6.0, "iters": 0},
        "identity": {"invert": {"guidance": 1.0}, "frames": {"indices": [0, 1, 2, 3]}},
    }
    flags, notes = settings_flags(plain)
    assert flags == {"--dtype": "bf16", "--frames": 9, "--steps": 4, "--guidance": 6.0, "--inversion": "ddim"}
    assert notes == ["the id records guidance 1.0: with the source prompt equal to the negative prompt, guidance changes nothing", "4 frames used: 0, 1, 2, 3"]
    assert settings_flags({"dtype": "torch.float32"})[0] == {"--dtype": "fp32", "--inversion": "ddim"} and settings_flags({"dtype": "x"})[0]["--dtype"] == "x"
    assert settings_flags({}) == ({"--inversion": "ddim"}, [])


# ---------------------------------------------------------------------------- manifest


def test_manifest_roundtrip_and_records(tmp_path):
    m = new_manifest(ID_A, "inversion", {"steps": 50}, {"frames": 49})
    assert set(m) == {
        "format_version", "id", "kind", "created", "last_used", "settings", "summary", "files", "stages", "complete"
    }
    assert m["format_version"] == FORMAT_VERSION and m["complete"] is False and m["files"] == {}
    assert m["created"].endswith("+00:00")
    record_file(m, "trajectory/step_0000.safetensors", FileRecord("ab" * 32, 123))
    assert m["files"]["trajectory/step_0000.safetensors"] == {"sha256": "ab" * 32, "bytes": 123}
    assert file_record(m, "trajectory/step_0000.safetensors") == FileRecord("ab" * 32, 123)
    assert file_record(m, "latents.safetensors") is None
    for bad in ("../x", "/abs", "a/../b", "./a", ""):
        with pytest.raises(ValueError):
            record_file(m, bad, FileRecord("0", 1))
    write_manifest(tmp_path / "manifest.json", m)
    assert read_manifest(tmp_path / "manifest.json") == m
    assert read_manifest(tmp_path / "missing.json") is None


@pytest.mark.parametrize("text", ['{"format_version": 1, "id": ', "[1, 2]", '{"id": "x"}', "\udcff"])
def test_corrupt_manifest_is_a_miss(tmp_path, caplog, text):
    path = tmp_path / "manifest.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, logger="cogedit.cache"):
        assert read_manifest(path) is None
    assert any(str(path) in r.getMessage() for r in caplog.records)


def test_newer_format_is_an_error(tmp_path):
    path = tmp_path / "manifest.json"
    m = new_manifest(ID_A, "inversion", {}, {})
    m["format_version"] = FORMAT_VERSION + 1
    write_manifest(path, m)
    with pytest.raises(CacheFormatError, match=rf"newer cogedit \(format {FORMAT_VERSION + 1}.*upgrade cogedit"):
        read_manifest(path)


def test_touch_updates_complete_manifests_only(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    m = new_manifest(ID_A, "inversion", {}, {})
    m["last_used"] = "2020-01-01T00:00:00+00:00"
    write_manifest(path, m)
    touch(path)
    assert read_manifest(path)["last_used"] == "2020-01-01T00:00:00+00:00"  # incomplete: left alone
    m["complete"] = True
    write_manifest(path, m)
    touch(path)
    assert read_manifest(path)["last_used"] > "2024"

    def read_only(*a, **k):
        raise ReadOnlyCacheError("read-only")

    m["last_used"] = "2020-01-01T00:00:00+00:00"
    write_manifest(path, m)
    monkeypatch.setattr(cache.manifest, "write_json_atomic", read_only)
    touch(path)  # a read-only cache is still readable
    touch(tmp_path / "missing.json")
    assert read_manifest(path)["last_used"] == "2020-01-01T00:00:00+00:00"


# ---------------------------------------------------------------------------- locks

_HOLDER = r"""
import sys, time
from pathlib import Path
from cache.layout import CacheLayout
from cache.lock import entry_lock
paths = CacheLayout(Path(sys.argv[1])).entry(sys.argv[2])
with entry_lock(paths):
    Path(sys.argv[3]).write_text("locked")
    time.sleep(float(sys.argv[4]))
"""


def _hold_lock_in_child(layout: CacheLayout, entry_id: str, seconds: float, marker: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(layout.root), entry_id, str(marker), str(seconds)], env=env
    )
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None, "lock holder exited early"
        assert time.monotonic() < deadline, "lock holder never took the lock"
        time.sleep(0.02)
    return child


def test_two_processes_contend_for_one_entry_lock(layout, tmp_path):
    paths = layout.entry(ID_A)
    child = _hold_lock_in_child(layout, ID_A, 1.5, tmp_path / "marker")
    try:
        with pytest.raises(CacheBusyError, match=rf"{ID_A}.lock.*wait for it.*no cogedit process"):
            with entry_lock(paths, timeout=0.2):
                pass
        waits: list[float] = []
        start = time.monotonic()
        with entry_lock(paths, timeout=30, poll_callback=waits.append):
            waited = time.monotonic() - start
        # The holder kept the lock ~1.3 s more: we waited, and said so through the callback.
        assert waited > 0.8 and waits and waits[0] < 0.2
    finally:
        child.wait(timeout=30)
    assert child.returncode == 0
    with entry_lock(paths, timeout=0):  # free again, and the lock file survives
        assert paths.lock.exists()


def test_lock_in_read_only_cache(tmp_path, monkeypatch):
    paths = CacheLayout(tmp_path / "c").entry(ID_A)

    def refuse(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(ReadOnlyCacheError, match="lock"):
        with entry_lock(paths):
            pass


# ---------------------------------------------------------------------------- store


def test_list_entries_shows_broken_ones(layout):
    _make_entry(layout, ID_A, last_used="2024-05-01T00:00:00+00:00")
    _make_entry(layout, ID_B, manifest=False)
    infos = {e.id: e for e in list_entries(layout)}
    assert set(infos) == {ID_A, ID_B}
    a, b = infos[ID_A], infos[ID_B]
    assert a.manifest_ok and a.complete and a.kind == "inversion" and a.summary == {"video": "v.mp4"}
    assert a.size_bytes == sum(p.stat().st_size for p in a.dir.rglob("*") if p.is_file())
    assert not b.manifest_ok and not b.complete and f"cogedit cache rm {ID_B}" in b.problem
    assert entry_info(layout, ID_A) == a
    with pytest.raises(InvalidEntryIdError, match="no cache entry"):
        entry_info(layout, "c" * 32)


def test_an_entrys_details_and_each_kind_of_broken_manifest(layout):
    from cache.store import entry_details

    _make_entry(layout, ID_A)
    paths = layout.entry(ID_A)
    m = read_manifest(paths.manifest)
    details = entry_details(layout, ID_A)
    rec = m["files"]["trajectory/step_0000.safetensors"]
    assert details == {
        "id": ID_A, "state": "complete", "problem": None, "dir": str(paths.dir), "size": entry_info(layout, ID_A).size_bytes,
        "created": m["created"], "last_used": "2024-01-01T00:00:00+00:00", "summary": {"video": "v.mp4"}, "settings": {"steps": 1},
        "flags": {"--inversion": "ddim"}, "notes": [], "stages": {}, "files": [{"file": "trajectory/step_0000.safetensors", **rec}], "attention": {},
    }
    paths.manifest.write_text("{not json")
    info = entry_info(layout, ID_A)
    assert (info.manifest_ok, info.kind, info.created, info.summary) == (False, None, None, {})
    assert info.problem == f"manifest.json is unreadable (an interrupted or damaged entry) — run `cogedit cache rm {ID_A}`"
    paths.manifest.unlink()
    assert entry_info(layout, ID_A).problem == f"manifest.json is missing (an interrupted or damaged entry) — run `cogedit cache rm {ID_A}`"
    newer = {**m, "format_version": FORMAT_VERSION + 1, "summary": {"video": "new.mp4"}}
    paths.manifest.write_text(json.dumps(newer))
    info = entry_info(layout, ID_A)
    assert not info.manifest_ok and "newer" in info.problem and info.summary == {"video": "new.mp4"} and info.kind == "inversion" and info.complete
    assert entry_details(layout, ID_A)["settings"] == {} and entry_details(layout, ID_A)["problem"] == info.problem


def test_verify_names_every_kind_of_damage_in_one_line_each(layout):
    ids = [c * 32 for c in "abcdef"]
    for i in ids:
        _make_entry(layout, i, payload=400)
    step = "trajectory/step_0000.safetensors"
    size = read_manifest(layout.entry(ids[0]).manifest)["files"][step]["bytes"]
    p = layout.entry(ids[0]).step_file(0)
    p.write_bytes(p.read_bytes() + b"x")  # a byte longer
    p = layout.entry(ids[1]).step_file(0)
    data = bytearray(p.read_bytes())
    data[-1] ^= 1  # the same size, another checksum
    p.write_bytes(bytes(data))
    layout.entry(ids[2]).manifest.unlink()
    layout.entry(ids[3]).manifest.write_text("{x")
    m = read_manifest(layout.entry(ids[4]).manifest)
    m["files"]["../x.safetensors"] = m["files"][step]
    m["files"]["trajectory/z.safetensors"] = {"sha256": 1}
    write_manifest(layout.entry(ids[4]).manifest, m)
    trajectory = layout.entry(ids[5]).dir / "trajectory"
    (trajectory / ".step_0001.safetensors.tmp-1-ab").write_bytes(b"x")
    (trajectory / "step_0009.safetensors").write_bytes(b"garbage!")  # not in the manifest, and damaged

    def rm(i: str) -> str:
        return f"run `cogedit cache rm {i}`"

    def corrupt(i: str, rel: str, problem: str) -> str:
        return f"cache entry {i} is corrupt: {rel} {problem} — {rm(i)}, then invert again to recompute it"

    a, b, c, d, e, f = ids
    assert [(p.entry_id, p.file, p.reason) for p in verify(layout)] == [
        (a, step, corrupt(a, step, f"is {size + 1} bytes but the manifest records {size}")),
        (b, step, corrupt(b, step, "fails its checksum")),
        (c, "manifest.json", f"is missing — {rm(c)}"),
        (d, "manifest.json", f"is unreadable (not valid manifest JSON) — {rm(d)}"),
        (e, "../x.safetensors", f"the manifest lists a path outside the entry — {rm(e)}"),
        (e, "trajectory/z.safetensors", f"its manifest record is damaged — {rm(e)}"),
        (f, "trajectory/.step_0001.safetensors.tmp-1-ab", f"leftover temporary file from an interrupted write — delete it (safe) or {rm(f)}"),
        (f, "trajectory/step_0009.safetensors", corrupt(f, "trajectory/step_0009.safetensors", "is truncated or has a damaged safetensors header")),
    ]
    assert verify(layout, [a]) == verify(layout)[:1]


def test_recorded_edits_list_newest_first_and_skip_what_cannot_play(layout, monkeypatch):
    import cache.edits
    from cache.edits import EditRecord, list_edits, record_edit

    paths = layout.entry(ID_A)
    paths.edits_dir.mkdir(parents=True)
    times = iter(["2024-01-01T00:00:00+00:00", "2024-02-01T00:00:00+00:00", "2024-03-01T00:00:00+00:00"])
    monkeypatch.setattr(cache.edits, "utc_now", lambda: next(times))
    made = []
    for n in range(3):
        video, pair = paths.edits_dir / f"e{n}.mp4", paths.edits_dir / f"e{n}-side-by-side.mp4"
        video.write_bytes(b"v"), pair.write_bytes(b"p")
        made.append(record_edit(paths, video, pair, f"prompt {n}", {"guidance": n}))
    assert made[0] == EditRecord("prompt 0", {"guidance": 0}, paths.edits_dir / "e0.mp4", paths.edits_dir / "e0-side-by-side.mp4", "2024-01-01T00:00:00+00:00")
    assert json.loads((paths.edits_dir / "e0.json").read_text()) == {
        "prompt": "prompt 0", "settings": {"guidance": 0}, "video": "e0.mp4", "side_by_side": "e0-side-by-side.mp4", "created": "2024-01-01T00:00:00+00:00",
    }
    assert list_edits(paths) == made[::-1]
    (paths.edits_dir / "e2-side-by-side.mp4").unlink()  # a video gone: not listed
    (paths.edits_dir / "bad.json").write_text("{")  # unreadable
    (paths.edits_dir / "out.json").write_text(json.dumps({**json.loads((paths.edits_dir / "e0.json").read_text()), "video": "../e0.mp4"}))
    (paths.edits_dir / "keyless.json").write_text(json.dumps({"prompt": "x"}))
    assert list_edits(paths) == [made[1], made[0]]
    with pytest.raises(ValueError, match="is not in"):
        record_edit(paths, layout.root / "e.mp4", paths.edits_dir / "e0-side-by-side.mp4", "p", {})


def test_an_inversion_entry_from_new_to_complete(layout):
    """InversionEntry's life as the engine drives it, read back from disk at each stage."""
    from cache.entry import InversionEntry

    paths = layout.entry(ID_A)
    assert InversionEntry.read(paths) is None  # no manifest yet: a miss
    settings = {"invert": {"steps": 3, "source_prompt": "a rabbit"}, "dtype": "torch.float32", "model": {"key": "k", "source": "/m"},
                "frames": {"max_frames": 9}}
    entry = InversionEntry.new(paths, {"video": "v"}, settings, {"video": "v.mp4", "fps": 12.5})
    entry.write()

    def again() -> InversionEntry:
        return InversionEntry.read(paths)

    e = again()
    assert e.manifest["settings"] == {**settings, "format": FORMAT_VERSION, "identity": {"video": "v"}} and e.manifest["kind"] == "inversion"
    assert (e.id, e.complete, e.steps, e.source_prompt, e.dtype_name, e.model_key, e.model_source) == (ID_A, False, 3, "a rabbit", "torch.float32", "k", "/m")
    assert (e.frames, e.fps, e.encoded, e.steps_done, e.verify, e.stores()) == (9, 12.5, False, 0, None, {})
    entry.mark_encoded(5, [1, 2, 3])
    e = again()
    assert (e.encoded, e.frames, e.manifest["summary"]["latent_shape"]) == (True, 5, [1, 2, 3])
    step = paths.step_file(0)
    entry.save(step, {"x": torch.arange(4.0)}, t=999)
    entry.mark_step(0)
    e = again()
    assert e.steps_done == 1 and e.manifest["stages"]["invert"] == {"done": 1, "total": 3}
    assert e.has_file(step) and e.record_of(step) == FileRecord(**e.manifest["files"]["trajectory/step_0000.safetensors"])
    assert read_metadata(step)["t"] == "999" and torch.equal(e.load(step, "x"), torch.arange(4.0))
    assert e.files_under(paths.dir / "trajectory") == [step] and e.files_under(paths.dir / "traj") == []
    assert e.size_of([step]) == step.stat().st_size and e.missing_files() == []
    entry.set_verify({"psnr_db": 40.0})
    entry.set_store("s1", {"steps": [1]})
    entry.mark_complete()
    e = again()
    assert e.complete and e.verify == {"psnr_db": 40.0} and e.stores() == {"s1": {"steps": [1]}}
    step.write_bytes(step.read_bytes() + b"x")
    assert e.missing_files() == ["trajectory/step_0000.safetensors"]
    step.unlink()
    assert e.missing_files() == ["trajectory/step_0000.safetensors"]
    e.forget(step)
    assert not e.has_file(step) and e.record_of(step) is None and e.missing_files() == []


def test_an_unusable_manifest_is_a_miss_with_a_warning_naming_it(tmp_path, caplog):
    path = tmp_path / "manifest.json"
    cases = {
        b"\xff\xfe": f"ignoring unreadable cache manifest {path} (",
        b"{x": f"ignoring corrupt cache manifest {path} (Expecting property name",
        b"[1]": f"ignoring cache manifest {path}: not a cogedit manifest; the entry will be recomputed",
        b'{"format_version": "1"}': f"ignoring cache manifest {path}: not a cogedit manifest; the entry will be recomputed",
    }
    for data, message in cases.items():
        path.write_bytes(data)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cogedit"):
            assert read_manifest(path) is None
        assert [r.getMessage()[: len(message)] for r in caplog.records] == [message], data
    path.write_text(json.dumps({"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CacheFormatError, match=str(path)):
        read_manifest(path)


def test_remove_entry(layout):
    _make_entry(layout, ID_A)
    size = entry_info(layout, ID_A).size_bytes
    assert remove_entry(layout, ID_A) == size > 10_000
    assert not layout.entry(ID_A).dir.exists()
    assert list(layout.trash_dir.iterdir()) == []
    with pytest.raises(InvalidEntryIdError, match="cogedit cache ls"):
        remove_entry(layout, ID_A)


def test_remove_locked_entry_is_busy(layout):
    _make_entry(layout, ID_A)
    with entry_lock(layout.entry(ID_A)):
        with pytest.raises(CacheBusyError, match=ID_A):
            remove_entry(layout, ID_A, timeout=0.1)
    assert (layout.entry(ID_A).manifest).exists()
    remove_entry(layout, ID_A)


def _gc_fixture(layout: CacheLayout) -> dict[str, str]:
    ids = {name: digit * 32 for name, digit in zip(("old", "mid", "new", "partial", "broken"), "12345")}
    _make_entry(layout, ids["old"], last_used="2024-01-01T00:00:00+00:00")
    _make_entry(layout, ids["mid"], last_used="2024-02-01T00:00:00+00:00")
    _make_entry(layout, ids["new"], last_used="2024-03-01T00:00:00+00:00")
    _make_entry(layout, ids["partial"], last_used="2024-06-01T00:00:00+00:00", complete=False)
    _make_entry(layout, ids["broken"], manifest=False)  # folder mtime = now
    return ids


def test_gc_removes_incomplete_first_then_lru(layout):
    ids = _gc_fixture(layout)
    sizes = {e.id: e.size_bytes for e in list_entries(layout)}
    total = sum(sizes.values())
    limit = total - sizes[ids["partial"]] - sizes[ids["broken"]] - sizes[ids["old"]]
    order = [ids["partial"], ids["broken"], ids["old"]]

    planned = gc(layout, limit, dry_run=True)
    assert [e.id for e in planned] == order
    assert len(list_entries(layout)) == 5  # dry run removes nothing

    removed = gc(layout, limit)
    assert [e.id for e in removed] == order
    left = list_entries(layout)
    assert [e.id for e in left] == [ids["new"], ids["mid"]]  # most recently used first
    assert sum(e.size_bytes for e in left) == limit
    assert gc(layout, limit) == []  # already small enough
    assert [e.id for e in gc(layout, 0)] == [ids["mid"], ids["new"]]
    assert list_entries(layout) == []


def test_gc_skips_locked_entries_and_removes_prompts_last(layout):
    ids = _gc_fixture(layout)
    prompts = []
    for n, age in enumerate((100, 300, 200)):
        path = layout.prompt_file(ID_A, str(n) * 16)
        save_tensors(path, {"embeds": torch.zeros(1000)})
        os.utime(path, (time.time() - age, time.time() - age))
        prompts.append(path)
    sizes = {e.id: e.size_bytes for e in list_entries(layout)}
    # Fits "old" and two prompts: the oldest prompt has to go too, but "old" is locked.
    limit = sizes[ids["old"]] + prompts[0].stat().st_size + prompts[2].stat().st_size
    with entry_lock(layout.entry(ids["old"])):
        removed = gc(layout, limit)
    is_prompt = [e.kind == "prompt" for e in removed]
    assert [e.id for e in removed[:4]] == [ids["partial"], ids["broken"], ids["mid"], ids["new"]]
    assert is_prompt == [False] * 4 + [True]
    assert removed[-1].id == "1" * 16 and removed[-1].summary == {"model_key": ID_A}  # oldest prompt
    assert not prompts[1].exists() and prompts[0].exists() and prompts[2].exists()
    assert [e.id for e in list_entries(layout)] == [ids["old"]]
    with pytest.raises(ValueError):
        gc(layout, -1)


def _verified_entry(layout: CacheLayout) -> None:
    paths = layout.entry(ID_A)
    m = new_manifest(ID_A, "inversion", {}, {})
    for path in (paths.latents, paths.step_file(0), paths.step_file(1)):
        record_file(m, paths.relative(path), save_tensors(path, {"x": torch.randn(8, 8)}))
    m["complete"] = True
    write_manifest(paths.manifest, m)


def test_verify_clean_cache(layout):
    _verified_entry(layout)
    save_tensors(layout.prompt_file(ID_B, ID_A), {"embeds": torch.ones(4)})
    assert verify(layout) == []
    assert verify(layout, [ID_A]) == []


def test_verify_reports_damage(layout):
    _verified_entry(layout)
    paths = layout.entry(ID_A)
    step = paths.step_file(1)
    data = bytearray(step.read_bytes())
    data[-1] ^= 0x80
    step.write_bytes(bytes(data))
    paths.step_file(0).write_bytes(paths.step_file(0).read_bytes()[:-3])
    paths.latents.unlink()
    (paths.trajectory_dir / ".step_0002.safetensors.tmp-1-abcd").write_bytes(b"partial")
    unlisted = paths.step_file(3)
    save_tensors(unlisted, {"x": torch.ones(3)})
    unlisted.write_bytes(unlisted.read_bytes()[:-1])
    prompt = layout.prompt_file(ID_B, ID_A)
    save_tensors(prompt, {"embeds": torch.ones(4)})
    prompt.write_bytes(prompt.read_bytes()[:-2] + b"\0\1")

    found = {(p.entry_id, p.file): p.reason for p in verify(layout)}
    assert set(found) == {
        (ID_A, "latents.safetensors"),
        (ID_A, "trajectory/step_0000.safetensors"),
        (ID_A, "trajectory/step_0001.safetensors"),
        (ID_A, "trajectory/.step_0002.safetensors.tmp-1-abcd"),
        (ID_A, "trajectory/step_0003.safetensors"),
        ("prompts", f"{ID_B}/{ID_A}.safetensors"),
    }
    assert "missing" in found[(ID_A, "latents.safetensors")]
    assert "manifest records" in found[(ID_A, "trajectory/step_0000.safetensors")]
    assert "fails its checksum" in found[(ID_A, "trajectory/step_0001.safetensors")]
    assert "leftover temporary file" in found[(ID_A, "trajectory/.step_0002.safetensors.tmp-1-abcd")]
    assert "fails its checksum" in found[("prompts", f"{ID_B}/{ID_A}.safetensors")]
    assert all(p.entry_id == ID_A for p in verify(layout, [ID_A]))


def test_verify_reports_bad_manifest_and_still_checks_files(layout):
    _verified_entry(layout)
    paths = layout.entry(ID_A)
    paths.manifest.write_text("{not json")
    data = bytearray(paths.latents.read_bytes())
    data[-1] ^= 0x01
    paths.latents.write_bytes(bytes(data))
    found = {p.file: p.reason for p in verify(layout)}
    assert set(found) == {"manifest.json", "latents.safetensors"}
    assert "unreadable" in found["manifest.json"] and f"cogedit cache rm {ID_A}" in found["manifest.json"]
    with pytest.raises(InvalidEntryIdError):
        verify(layout, ["c" * 32])


# ---------------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", 0),
        ("123", 123),
        ("10GB", 10 * 10**9),
        ("10gb", 10 * 10**9),
        ("500MiB", 500 * 2**20),
        ("1.5G", 3 * 2**29),
        (" 2 TiB ", 2 * 2**40),
        ("64k", 64 * 1024),
        ("1.5kB", 1500),
        ("7B", 7),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "10 XB", "1e9", "ten", "1,5G"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="e.g. 0, 500MiB, 10GB"):
        parse_size(text)


def test_format_size():
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(2_300_000) == "2.2 MiB"
    assert format_size(9_200_000_000) == "8.6 GiB"
    assert format_size(-2048) == "-2.0 KiB"
    # the unit changes exactly at 1024 of the smaller one; PiB is the last
    assert [format_size(n) for n in (1024, 1024**2 - 1, 1024**2)] == ["1.0 KiB", "1024.0 KiB", "1.0 MiB"]
    assert [format_size(3 * 1024**4), format_size(3 * 1024**5), format_size(2048 * 1024**5)] == ["3.0 TiB", "3.0 PiB", "2048.0 PiB"]
    with pytest.raises(ValueError, match=r"e.g. 0, 500MiB, 10GB or 1.5G \(G = GiB = 2\^30 bytes, GB = 10\^9 bytes\)$"):
        parse_size(10)  # not text: a one-line error, not a TypeError


def test_gc_counts_and_removes_compiled_kernels_with_the_prompts(layout):
    """--compile's kernels (<cache>/compile/*.bin) are cache too: gc weighs them and drops the oldest."""
    layout.compile_dir.mkdir(parents=True)
    old, new = layout.compile_dir / "a.bin", layout.compile_dir / "b.bin"
    for path, age in ((old, 300), (new, 100)):
        write_bytes_atomic(path, b"x" * 1000)
        os.utime(path, (time.time() - age, time.time() - age))
    removed = gc(layout, 1500)
    assert [(e.kind, e.id) for e in removed] == [("compiled kernels", "a")]
    assert not old.exists() and new.exists()


# ---------------------------------------------------------------------------- layout's paths and one-line errors


def test_layout_names_every_path_and_refuses_what_is_not_an_id_in_one_exact_line(tmp_path, monkeypatch):
    """The folder tree of the module docstring, and each refusal's text (what is wrong, then the fix)."""
    layout = CacheLayout(tmp_path)
    eid = "ab" * 16
    p = layout.entry(eid)
    d = tmp_path / "inversions" / eid
    assert (p.edits_dir, p.thumbnails, p.lock) == (d / "edits", d / "thumbnails.png", layout.locks_dir / f"{eid}.lock")
    assert p.step_file(0).name == "step_0000.safetensors" and p.step_file(9999).name == "step_9999.safetensors"
    for bad in (-1, 10000, 1.0, True):
        with pytest.raises(ValueError) as err:
            p.step_file(bad)
        assert str(err.value) == f"step index must be an int in 0..9999, got {bad!r}"
    assert p.attention_block("cd" * 8, 999, 3) == d / "attention" / ("cd" * 8) / "t_0999" / "b_03.safetensors"
    with pytest.raises(InvalidEntryIdError) as err:
        validate_entry_id("../x")
    assert str(err.value) == "'../x' is not a cache id (ids are 16-64 lowercase hex characters) — copy one from `cogedit cache ls`"
    for what, args in (("model key", ("xyz", "ef" * 8)), ("prompt key", ("ef" * 8, "xyz"))):
        with pytest.raises(InvalidEntryIdError) as err:
            layout.prompt_file(*args)
        assert str(err.value) == f"{what} 'xyz' is not a cache key (16-64 lowercase hex characters) — build it with cache.keys.stable_hash"
    monkeypatch.setenv("COGEDIT_CACHE", str(tmp_path / "env"))
    assert cache_root("") == tmp_path / "env" and cache_root(tmp_path / "given") == tmp_path / "given"


def test_an_id_prefix_resolves_to_one_entry_or_says_why_not_in_one_exact_line(tmp_path):
    layout = CacheLayout(tmp_path)
    ids = ["abcd" + f"{n:02x}" * 14 for n in range(7)] + ["ef" * 16]
    for i in ids:
        layout.entry(i).dir.mkdir(parents=True)
    (layout.entries_dir / ("01" * 16)).write_text("a file, not an entry")
    assert layout.entry_ids() == sorted(ids)
    assert resolve_entry_id(layout, " EFEF ") == "ef" * 16
    with pytest.raises(InvalidEntryIdError) as err:
        resolve_entry_id(layout, "ab")
    assert str(err.value) == "'ab' is not an id prefix (use at least 4 hex characters of an id) — run `cogedit cache ls` to see ids"
    with pytest.raises(InvalidEntryIdError) as err:
        resolve_entry_id(layout, "0123")
    assert str(err.value) == f"no cache entry in {tmp_path} has an id starting with '0123' — run `cogedit cache ls` to see ids"
    with pytest.raises(InvalidEntryIdError) as err:
        resolve_entry_id(layout, "abcd")
    shown = ", ".join(i[:12] + "…" for i in sorted(ids)[:5])
    assert str(err.value) == f"id prefix 'abcd' matches 7 entries ({shown}) — type more characters; run `cogedit cache ls` to see ids"


def test_a_busy_or_unwritable_lock_says_so_in_one_exact_line(tmp_path):
    from cache.lock import _busy, _read_only

    p = CacheLayout(tmp_path).entry("ab" * 16)
    assert str(_busy(p, 2.25)) == (
        f"cache entry {p.id} is busy: another process holds {p.lock} (waited 2.2s) — wait for it to finish, or delete that lock file if no cogedit process is running"
    )
    exc = OSError(errno.EROFS, "Read-only file system")
    assert str(_read_only(p, exc)) == f"cannot create lock file {p.lock}: Read-only file system — pass --cache-dir to a writable folder or set COGEDIT_CACHE"
    assert str(_read_only(p, OSError("no strerror"))).startswith(f"cannot create lock file {p.lock}: no strerror — ")


def test_a_long_clips_settings_read_back_as_the_flags_that_made_them():
    """`cache show` of a windowed inversion of every frame with another attention kernel: the flags
    of the engine's newer options, each only when it was in effect."""
    from cache.store import settings_flags

    settings = {
        "frames": {"max_frames": None, "fps": 8.0, "height": 96, "width": 160},
        "invert": {"steps": 4, "window": 13, "overlap": 4, "iters": 0},
        "identity": {"attention": "fa4"},
    }
    flags, _ = settings_flags(settings)
    assert {k: flags.get(k) for k in ("--frames", "--fps", "--window-overlap", "--attention")} == {"--frames": "all", "--fps": 8.0, "--window-overlap": 4, "--attention": "fa4"}
    one_window = {"frames": {"max_frames": 49}, "invert": {"steps": 4, "overlap": 4, "iters": 0}}  # no window: the overlap did nothing
    assert {k: settings_flags(one_window)[0].get(k) for k in ("--frames", "--window-overlap", "--fps", "--attention")} == {"--frames": 49, "--window-overlap": None, "--fps": None, "--attention": None}


def test_removing_a_missing_or_unmovable_entry_says_so_in_one_exact_line(tmp_path, monkeypatch):
    layout = CacheLayout(tmp_path / "deep" / "cache")  # no trash folder yet, nor its parents
    eid = "ab" * 16
    with pytest.raises(InvalidEntryIdError) as err:
        remove_entry(layout, eid)
    assert str(err.value) == f"no cache entry {eid} in {layout.root} — run `cogedit cache ls` to see ids"
    layout.entry(eid).dir.mkdir(parents=True)
    (layout.entry(eid).dir / "latents.safetensors").write_bytes(b"x" * 10)
    real_rename = os.rename

    def refuse(src, dst):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(ReadOnlyCacheError) as err:
        remove_entry(layout, eid)
    assert str(err.value) == f"cannot remove {layout.entry(eid).dir}: Permission denied — check the cache folder's permissions, or pass --cache-dir to a writable cache"
    monkeypatch.setattr(os, "rename", real_rename)
    assert remove_entry(layout, eid) == 10 and not layout.entry(eid).dir.exists()
    assert list(layout.trash_dir.iterdir()) == []  # the renamed folder is deleted at once


def test_a_listed_plain_file_is_checked_by_size_then_checksum_in_one_exact_line(tmp_path):
    """Files that are not safetensors (the thumbnails, an edit's mp4) are checked against the
    manifest's size and sha256, each failure named with the file and the fix."""
    from cache.atomic import corrupt_error
    from cache.store import _check_file

    thumbs = CacheLayout(tmp_path).entry("ab" * 16).thumbnails
    thumbs.parent.mkdir(parents=True)
    thumbs.write_bytes(b"png!")
    good = FileRecord(hashlib.sha256(b"png!").hexdigest(), 4)
    assert _check_file(thumbs, good, False) is None and _check_file(thumbs, None, False) is None
    assert _check_file(thumbs, FileRecord(good.sha256, 5), False) == str(corrupt_error(thumbs, "is 4 bytes but the manifest records 5"))
    assert _check_file(thumbs, FileRecord("0" * 64, 4), False) == str(corrupt_error(thumbs, "fails its checksum"))
    assert _check_file(tmp_path / "gone.png", good, False) == "cannot be read: No such file or directory — check the file's permissions"


def test_verify_reports_a_leftover_and_a_damaged_embedding_under_prompts_only(tmp_path):
    from cache.atomic import TMP_MARK
    from cache.store import Problem

    layout = CacheLayout(tmp_path)
    layout.ensure()
    folder = layout.prompts_dir / ("cd" * 8)
    folder.mkdir(parents=True)
    (folder / f"x{TMP_MARK}1").write_bytes(b"half")
    (folder / ("ef" * 8 + ".safetensors")).write_bytes(b"not a tensor file")
    (layout.compile_dir).mkdir(parents=True, exist_ok=True)
    (layout.compile_dir / f"k{TMP_MARK}.bin").write_bytes(b"kernels are not checked here")
    problems = verify(layout)
    found = {p.file: p for p in problems}
    assert sorted(found) == sorted([f"{'cd' * 8}/x{TMP_MARK}1", f"{'cd' * 8}/{'ef' * 8}.safetensors"])  # not the kernels' folder
    assert all(isinstance(p, Problem) and p.entry_id == "prompts" for p in problems)
    assert found[f"{'cd' * 8}/x{TMP_MARK}1"].reason == "leftover temporary file from an interrupted write — delete it (safe)"
    assert found[f"{'cd' * 8}/{'ef' * 8}.safetensors"].reason
