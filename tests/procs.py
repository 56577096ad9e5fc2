"""Real `cogedit` processes for the crash and concurrency tests, without paying imports each time.

Importing torch, diffusers and transformers costs ~8 s of CPU per interpreter, and these tests
need a few dozen processes on a 2-core box. `Forker` starts one interpreter (`python -m
tests.procs`) that imports everything and then forks one child per command line: each child is a
real process with its own pid, environment, stdout/stderr files, file locks and signals, which
runs `cli.main()` exactly as `python cli.py ...` does, and can be killed, interrupted or raced.
The server runs no model itself, so no thread pool exists yet when it forks.

Protocol: one JSON request per line on the server's stdin, one JSON reply per line on its stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Child:
    pid: int
    out: Path
    err: Path
    rc: int | None = None  # exit code, or minus the signal that killed it

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


class Forker:
    """Client of the fork server; `start` returns at once, `wait` collects the exit status."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        # Passive OpenMP waits: several children share 2 cores, and spinning threads would starve them.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
        self._log = open(logs / "server.err", "w")
        self._server = subprocess.Popen(
            [sys.executable, "-m", "tests.procs"], cwd=ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
        )
        self._count = 0

    def _ask(self, **request) -> dict:
        self._server.stdin.write(json.dumps(request) + "\n")
        self._server.stdin.flush()
        line = self._server.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died: {(self.logs / 'server.err').read_text()}")
        return json.loads(line)

    def start(self, *argv: object, env: dict[str, str] | None = None, obey_file_modes: bool = False) -> Child:
        """Run `cogedit ARGV` in a new child; `obey_file_modes`: even as root (see _obey_file_modes)."""
        self._count += 1
        out, err = self.logs / f"{self._count}.out", self.logs / f"{self._count}.err"
        reply = self._ask(op="start", argv=[str(a) for a in argv], env=env or {}, out=str(out), err=str(err), obey_file_modes=obey_file_modes)
        return Child(reply["pid"], out, err)

    def wait(self, child: Child, timeout: float = 120.0) -> Child:
        child.rc = self._ask(op="wait", pid=child.pid, timeout=timeout)["rc"]
        if child.rc is None:
            raise TimeoutError(f"cogedit child {child.pid} still running after {timeout} s; stderr:\n{child.stderr}")
        return child

    def running(self, child: Child) -> bool:
        return self._ask(op="poll", pid=child.pid)["running"]

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait(timeout=60)
        self._server.stdout.close()
        self._log.close()


# ------------------------------------------------------------------------------------- server


def _obey_file_modes() -> None:
    """Drop root's power to ignore file modes, for this process and what it runs (Linux).

    Without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, root is held to a file's mode bits like any
    owner, so a folder chmod-ed read-only refuses its writes for real.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    caps = (1, 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    for cap in caps:  # from the bounding set too, or an exec'ed child gets them back
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~sum(1 << cap for cap in caps) & 0xFFFFFFFF
    data[0].effective &= keep
    data[0].permitted &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _child(request: dict) -> None:
    import traceback

    import cli

    for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), (2, request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        os.dup2(os.open(name, flags, 0o666), fd)
    os.environ.update(request["env"])
    if request["obey_file_modes"] and os.geteuid() == 0:
        _obey_file_modes()
    sys.argv = ["cogedit", *request["argv"]]
    code = 1
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _status(pid: int, flags: int) -> int | None:
    done, status = os.waitpid(pid, flags)
    if not done:
        return None
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _serve() -> None:
    import signal
    import threading
    import time

    # Everything a cogedit run imports, so that children start warm.
    import diffusers  # noqa: F401
    import rich.logging  # noqa: F401
    import rich.progress  # noqa: F401
    import rich.table  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel, DDIMInverseScheduler  # noqa: F401
    from diffusers.utils import export_to_video  # noqa: F401
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, T5EncoderModel  # noqa: F401

    import cli  # noqa: F401
    import engine  # noqa: F401

    assert threading.active_count() == 1, "forking a process with threads"
    exited: dict[int, int] = {}
    started: list[int] = []
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "start":
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(request)
            started.append(pid)
            reply = {"pid": pid}
        elif request["op"] == "poll":
            pid = request["pid"]
            if pid not in exited and (rc := _status(pid, os.WNOHANG)) is not None:
                exited[pid] = rc
            reply = {"running": pid not in exited}
        else:  # wait
            pid, deadline = request["pid"], time.monotonic() + request["timeout"]
            while pid not in exited and time.monotonic() < deadline:
                if (rc := _status(pid, os.WNOHANG)) is not None:
                    exited[pid] = rc
                else:
                    time.sleep(0.05)
            reply = {"rc": exited.get(pid)}
        print(json.dumps(reply), flush=True)
    for pid in started:  # the client is gone: leave no process behind
        if pid not in exited:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


if __name__ == "__main__":
    _serve()
