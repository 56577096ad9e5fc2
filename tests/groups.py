"""Process groups whose members are threads of this process: real gloo collectives, in one process.

The split edit's exchanges (engine.hooks.token_exchange, GuidanceSplit.combine) run in torchrun
workers, and mutation testing sees only what runs in the test's own process (mutmut records which
tests reach a function, and switches mutants, there). Here each of n threads is one rank of a gloo
group over an in-memory store, so the same collectives run where it sees them, in a second instead
of a worker launch's ten. Written here: torch.distributed makes a group without a default group
only through these internals (init_process_group allows one group per process), and the testing
module that runs ranks as threads patches that global state for its own test classes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def _group(store: dist.Store, rank: int, size: int) -> dist.ProcessGroup:
    group = dist.ProcessGroup(store, rank, size)
    gloo = dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=60))
    group._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, gloo)
    group._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    return group


def in_threads(size: int, fn: Callable[[Any, int], Any]) -> list[Any]:
    """`fn(group, rank)` on `size` threads, each a rank of one group; their results by rank. An
    error in any thread is raised here (the others, waiting on it, end with the store's timeout)."""
    store = dist.HashStore()
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = fn(_group(dist.PrefixStore("group", store), rank, size), rank)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
