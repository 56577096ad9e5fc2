"""Compiled kernels kept in cogedit's cache, so that a new process skips most of `--compile`'s warm-up.

torch.compile keeps inductor's output under /tmp by default, where a reboot or a cleanup wipes it
and `cogedit cache gc` cannot see it. cogedit saves torch's portable cache artifacts
(`torch.compiler.save_cache_artifacts`: AOTAutograd and inductor graphs, Triton kernels) after a
compiled phase, one file per torch version, GPU and settings, and loads them before the next
compiled phase's first forward:

    <cache>/compile/<key>.bin        key = hash of torch, GPU, dtype, fp8, attention kernel, plan, transformer config
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cache.atomic import write_bytes_atomic
from cache.errors import CacheError
from cache.keys import stable_hash

log = logging.getLogger("cogedit")


def artifacts_path(compile_dir: Path, runtime: Any, transformer_config: dict[str, Any]) -> Path:
    device = torch.device(runtime.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = {
        "torch": torch.__version__,
        "gpu": gpu,
        "dtype": str(runtime.dtype),
        "fp8": runtime.fp8,
        **({"attention": runtime.attention} if runtime.attention != "sdpa" else {}),  # sdpa: the keys before kernels were a choice
        "plan": runtime.plan.name,
        "transformer": transformer_config,
    }
    return Path(compile_dir) / f"{stable_hash(key)}.bin"


@contextlib.contextmanager
def compile_artifacts(path: Path) -> Iterator[None]:
    """Load the artifacts at `path` (when there) for the duration; save what was compiled after."""
    if path.is_file():
        try:
            torch.compiler.load_cache_artifacts(path.read_bytes())
        except Exception as exc:  # stale or damaged: compile from scratch, and overwrite it below
            log.warning("ignoring compiled-kernel cache %s (%s); compiling again", path, exc)
    yield
    saved = torch.compiler.save_cache_artifacts()
    if saved is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, saved[0])
        except (OSError, CacheError) as exc:  # a read-only or full cache still edits
            log.warning("compiled kernels not cached: %s", exc)
