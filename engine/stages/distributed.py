"""Several processes through torch.distributed: starting them (torchrun's launcher), giving each
its device and process group, and how `--gpus N` workers share one transformer call (`Mesh`: the
guidance halves, `GuidanceSplit`, each over a group splitting the tokens, `TokenSplit`).

`launch(fn, n, *args)` is `torchrun --standalone --nproc-per-node n` called from Python
(torch.distributed.launcher.elastic_launch, the API torchrun itself runs on): it starts n workers,
sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR for each, runs `fn(*args)` in every one and
returns their results by rank. A worker started by hand with `torchrun` sees the same variables,
so everything below works the same under either.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import pickle
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.errors import USER_ERRORS, DeviceError, SettingsError, WorkerError
from engine.hooks.token_exchange import TokenSplit

# NVLink multicast (NVLS) off in every process we start: our collectives move a few MB per step,
# which multicast does not speed up, and on shared hosts a program using it can take the GPUs out
# of service for others.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def under_torchrun() -> bool:
    """True in a worker that torchrun (or `launch`) started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def check_worker_device(device: str | None) -> None:
    """Refuse a --device that names one GPU for several workers: before any worker starts, and in
    a worker unless it names that worker's own GPU (what `worker_device` resolved it to)."""
    own = f"cuda:{os.environ['LOCAL_RANK']}" if under_torchrun() else None
    if device not in (None, "cuda", "cpu", own):
        raise SettingsError(f"--device {device} with several workers: leave --device out (each worker takes GPU LOCAL_RANK) or pass --device cpu")


def worker_device(device: str | None) -> str:
    """This worker's device: GPU LOCAL_RANK where there are GPUs, else the CPU. Resolving it again
    gives the same device (a worker hands it on to the stages it runs)."""
    check_worker_device(device)
    if device == "cpu" or (device is None and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: torch sees no GPU; check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or pass --device cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if local >= torch.cuda.device_count():
        raise DeviceError(f"worker {local} of this machine has no GPU of its own ({torch.cuda.device_count()} visible); start at most that many workers per machine")
    torch.cuda.set_device(local)
    return f"cuda:{local}"


# How long a worker may wait in a collective: `run --gpus 2`'s second worker waits while the first
# inverts (minutes for a long clip); a dead worker is noticed by torchrun long before.
WAIT = timedelta(hours=6)


@contextlib.contextmanager
def process_group(backend: str, timeout: timedelta = WAIT) -> Iterator[None]:
    """The default process group for the `with` block (torchrun's env:// rendezvous), unless one is
    already up (then its owner ends it)."""
    if dist.is_initialized():
        yield
        return
    os.environ.update(MULTICAST_OFF)
    # NCCL bound to this worker's GPU up front: barriers and collectives then use no other.
    bound = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
    dist.init_process_group(backend, timeout=timeout, device_id=bound)
    try:
        yield
    finally:
        dist.destroy_process_group()


def backend_for(device: str) -> str:
    """NCCL between GPUs, gloo on the CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"


@dataclass(frozen=True)
class GuidanceSplit:
    """Classifier-free guidance over two groups of processes: half 0 runs the unconditional rows,
    half 1 the conditional ones, each with its own reference rows; every step the two halves of the
    v-prediction are gathered on both (over `group`, this process and its peer in the other half),
    so both take the same guided step."""

    rank: int  # which half
    group: Any = None  # None: the default group (of two)

    def own(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """This half of the rows [uncond..., cond...]."""
        return cond if self.rank else uncond

    def combine(self, v: torch.Tensor) -> torch.Tensor:
        """Both halves, [uncond..., cond...], from this one."""
        parts = [torch.empty_like(v) for _ in range(2)]
        dist.all_gather(parts, v.contiguous(), group=self.group)
        return torch.cat(parts)


def guidance_embeds(cond: torch.Tensor, uncond: torch.Tensor | None, half: GuidanceSplit | None) -> torch.Tensor:
    """The rows' text embeddings: [uncond x K, cond x K] with CFG (this process's half of them
    with `half`), else the K prompts' own; the inversion and the edit lay their rows out alike."""
    if uncond is None:
        return cond
    uncond = uncond.expand(cond.shape[0], -1, -1)
    return half.own(uncond, cond) if half is not None else torch.cat([uncond, cond])


GPUS = (1, 2, 4, 8)


def check_gpu_count(n: int) -> None:
    if n not in GPUS:
        raise SettingsError(f"--gpus takes {', '.join(map(str, GPUS))}, got {n}")


def shares(n: int, cfg: bool, heads: int) -> tuple[int, int]:
    """How `--gpus n` workers share a transformer call: (guidance halves, token split ways). The
    halves take 2 groups when the call has guidance's two halves; each group splits the tokens,
    heads shared out evenly (Ulysses), so the ways must divide the model's attention heads."""
    check_gpu_count(n)
    halves = 2 if cfg and n > 1 else 1
    ways = n // halves
    if heads % ways:
        fits = [g for g in GPUS if heads % (g // (2 if cfg and g > 1 else 1)) == 0]
        raise SettingsError(f"--gpus {n} splits the tokens {ways} ways, which the model's {heads} attention heads do not divide into: use --gpus {' or '.join(map(str, fits))}")
    return halves, ways


@dataclass(frozen=True)
class Mesh:
    """This worker's part of a call spread over all the workers: its guidance half (None: all the
    rows here) and its place in its half's token split (idle: all the tokens here). Worker r is
    half r // ways, token share r % ways."""

    guidance: GuidanceSplit | None
    tokens: TokenSplit

    @classmethod
    def make(cls, n: int, cfg: bool, heads: int) -> Mesh:
        """Every worker of `--gpus n` calls this at the same point: torch.distributed makes groups collectively."""
        if world_size() != n:
            raise SettingsError(f"--gpus {n} needs {n} workers, this group has {world_size()}; start it with --nproc-per-node {n}")
        halves, ways = shares(n, cfg, heads)
        half, share = divmod(rank(), ways)
        tokens, guidance = TokenSplit(), None
        if ways > 1:
            groups = [dist.new_group(list(range(h * ways, (h + 1) * ways))) for h in range(halves)]
            tokens = TokenSplit(groups[half], share, ways)
        if halves > 1:
            groups = [dist.new_group([w + h * ways for h in range(halves)]) for w in range(ways)]
            guidance = GuidanceSplit(half, groups[share])
        return cls(guidance, tokens)

    def describe(self) -> str:
        """For the phase's detail line."""
        parts = [f"{'unconditional' if self.guidance.rank == 0 else 'conditional'} rows here"] if self.guidance else []
        return ", ".join([*parts, *([f"tokens split {self.tokens.size} ways"] if self.tokens.on else [])])


# How many workers `invert` runs with (`run --gpus N`; 0: none, it runs alone): worker 0 leads and
# writes the cache, the others compute their shares of its steps (engine.stages.inversion.follow_inversion).
_TEAM: contextvars.ContextVar[int] = contextvars.ContextVar("cogedit_inversion_team", default=0)


@contextlib.contextmanager
def inversion_team(n: int) -> Iterator[None]:
    token = _TEAM.set(n)
    try:
        yield
    finally:
        _TEAM.reset(token)


def team_size() -> int:
    return _TEAM.get()


def tell_team(message: Any) -> Any:
    """Worker 0's `message` on every worker (None: its inversion is done)."""
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _entry(fn: Callable[..., Any], args: tuple, errors: str) -> Any:
    """A worker's body: `fn(*args)`; an error the user can act on is kept for the launcher, which
    re-raises it (torchrun only passes a failed worker's exit status on)."""
    try:
        return fn(*args)
    except USER_ERRORS as exc:
        Path(errors, f"{rank()}.pickle").write_bytes(pickle.dumps(exc))
        raise


def launch(fn: Callable[..., Any], nproc: int, *args: Any) -> dict[int, Any]:
    """Run `fn(*args)` in `nproc` workers on this machine through torchrun's launcher and return
    each worker's result by rank. When one worker fails, torchrun stops the others; the first
    typed error (lowest rank) is raised here, else a WorkerError naming the worker."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.update(MULTICAST_OFF)  # the workers inherit it
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # torchrun --standalone
        max_restarts=0, start_method="spawn",
    )
    # torchrun logs every failed worker's traceback, the others' lost connections too; the one
    # line below says what happened (COGEDIT_DEBUG=1 keeps the logs).
    loggers = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.multiprocessing")]
    levels = [log.level for log in loggers]
    if os.environ.get("COGEDIT_DEBUG") != "1":
        for log in loggers:
            log.setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="cogedit-workers-") as errors:
        try:
            return elastic_launch(config, _entry)(fn, args, errors)
        except ChildFailedError as exc:
            kept = sorted(Path(errors).glob("*.pickle"), key=lambda p: int(p.stem))
            if kept:
                raise pickle.loads(kept[0].read_bytes()) from None
            raise WorkerError(_failure_line(exc)) from None
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)


def _failure_line(exc: Any) -> str:
    worker, failure = min(exc.failures.items())
    code = failure.exitcode
    if code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
    else:  # an unforeseen error: its last line (the exception) when torchrun recorded one
        text = failure.message.get("message", "") if isinstance(failure.message, dict) else str(failure.message or "")
        last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
        how = f"failed: {last[:300]}" if last else f"exited with status {code}"
    return f"worker {worker} {how}; finished work is cached — run the same command again to finish the rest (COGEDIT_DEBUG=1 shows the workers' logs)"
