"""Bodies for the worker processes that tests/test_multigpu.py's launcher test starts: top-level
functions (the launcher pickles them by name) in a module that imports little."""

from __future__ import annotations

import os

from engine.errors import SettingsError
from engine.stages.distributed import rank


def where(tag: str, n: int) -> tuple:
    """What this worker was given and sees: its rank, the arguments, NVLink multicast's switch."""
    return rank(), tag, n, os.environ.get("NCCL_NVLS_ENABLE")


def refuse_on(bad: int, typed: bool, tally: str) -> int:
    """Worker `bad` fails, with an error the user can act on (`typed`) or an unforeseen one; every
    start of a worker adds a line to the file `tally` (a restarted group would add more)."""
    with open(tally, "a") as f:
        f.write(f"{rank()}\n")
    if rank() == bad:
        raise SettingsError(f"worker {bad}'s settings are bad") if typed else ZeroDivisionError(f"worker {bad} divided by zero")
    return rank()


def mesh_of(n: int, cfg: bool, heads: int) -> tuple:
    """This worker's place in `Mesh.make(n, cfg, heads)`: its description, and the ranks in its
    guidance pair and in its token group (gathered over those groups), and worker 0's word."""
    import torch
    import torch.distributed as dist

    from engine.stages.distributed import Mesh, process_group, tell_team

    with process_group("gloo"):
        mesh = Mesh.make(n, cfg, heads)
        me = torch.tensor([rank()])

        def members(group: object, size: int) -> list[int]:
            parts = [torch.zeros(1, dtype=me.dtype) for _ in range(size)]
            dist.all_gather(parts, me, group=group)
            return [int(p) for p in parts]

        pair = members(mesh.guidance.group, 2) if mesh.guidance else None
        tokens = members(mesh.tokens.group, mesh.tokens.size) if mesh.tokens.on else None
        return mesh.describe(), pair, tokens, mesh.tokens.rank, tell_team(f"from worker {rank()}")
