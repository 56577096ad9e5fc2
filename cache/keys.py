"""Cache keys: a stable sha256 of settings, and of file contents.

stable_hash canonicalizes its input to JSON, then hashes it. Conversion rule: a value hashes like
what it would become after a save/load through the manifest's JSON, so settings re-read from a
manifest give the same key as the live objects did:

    dict            keys turned to str (enum keys by value), sorted
    tuple, list     JSON list
    set, frozenset  JSON list, sorted by each element's canonical JSON
    dataclass       dict of its fields (recursively)
    enum member     its .value
    Path            posix string
    torch.dtype     "torch.bfloat16"    torch.device  "cuda:0"
    bytes           hex string
    float           JSON number; NaN/inf as the strings "NaN"/"Infinity"/"-Infinity"

Any other type is a TypeError: silently hashing repr() would put memory addresses into keys.
"""

import dataclasses
import enum
import hashlib
import json
import math
import os
import sys
from pathlib import PurePath
from typing import Any

FILE_CHUNK = 8 * 1024 * 1024


def _canonical(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, int, str)):
        if isinstance(obj, enum.Enum):  # IntEnum/StrEnum: hash the plain value
            return _canonical(obj.value)
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, enum.Enum):
        return _canonical(obj.value)
    if isinstance(obj, dict):
        return {_key(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_canonical(v) for v in obj), key=_dumps)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, PurePath):
        return obj.as_posix()
    # A torch dtype or device exists only once torch is imported; hashing needs no torch otherwise
    # (`cogedit plan` hashes model identities without importing it).
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    raise TypeError(
        f"stable_hash cannot hash a {type(obj).__qualname__}: convert it to "
        "str/int/float/bool/None, a list, a dict or a dataclass first"
    )


def _key(k: Any) -> str:
    k = _canonical(k)
    if isinstance(k, str):
        return k
    if k is None or isinstance(k, (bool, int, float)):
        return json.dumps(k)  # what json.dumps would do to the key anyway
    raise TypeError(f"stable_hash: dict key {k!r} is not a str, number, bool, None or enum")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(obj: Any) -> str:
    """The exact text stable_hash hashes (useful to see why two keys differ)."""
    return _dumps(_canonical(obj))


def stable_hash(obj: Any, length: int = 32) -> str:
    """sha256 of `obj`'s canonical JSON, as `length` lowercase hex characters."""
    if not 1 <= length <= 64:
        raise ValueError(f"length must be in 1..64 (a sha256 has 64 hex characters), got {length}")
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]


def sha256_file(path: str | os.PathLike[str], chunk: int = FILE_CHUNK) -> str:
    """sha256 of a file's bytes, read in `chunk`-sized pieces so big files stay out of memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
