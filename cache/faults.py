"""Fault injection for the crash tests: a process can be made to die at one named point.

`COGEDIT_TEST_KILL_AT=<point>:<n>` sends this process `COGEDIT_TEST_KILL_SIGNAL` (a signal name,
default SIGKILL) the n-th time `maybe_die(point)` runs; with `COGEDIT_TEST_KILL_RANK=r`, only in the
torch.distributed worker of rank r (its RANK). The points:

    write:<file name>   half of the file's bytes are in its temporary file (cache/atomic.py)
    encode              the VAE has encoded, the latents are not saved yet (engine/workflow.py)
    step                an inversion step's file and manifest are written (engine/stages/inversion.py), or
                        a worker other than 0 of `run --gpus N` finished its share of one
    edit                an edit step is finished, nothing of it written (engine/stages/editing.py)

Unset, as everywhere but in tests, it costs one environment lookup per call.
"""

import os
import signal
import threading

KILL_AT_ENV = "COGEDIT_TEST_KILL_AT"
KILL_SIGNAL_ENV = "COGEDIT_TEST_KILL_SIGNAL"
KILL_RANK_ENV = "COGEDIT_TEST_KILL_RANK"

_calls: dict[str, int] = {}
_lock = threading.Lock()  # files are written on several threads: no call may go uncounted


def maybe_die(point: str) -> None:
    """Signal this process if the environment names `point` and this is the n-th call for it."""
    target = os.environ.get(KILL_AT_ENV)
    if not target:
        return
    name, _, n = target.rpartition(":")
    if name != point:
        return
    if KILL_RANK_ENV in os.environ and os.environ.get("RANK") != os.environ[KILL_RANK_ENV]:
        return
    with _lock:
        _calls[point] = count = _calls.get(point, 0) + 1
    if count == int(n):
        os.kill(os.getpid(), getattr(signal, os.environ.get(KILL_SIGNAL_ENV, "SIGKILL")))
