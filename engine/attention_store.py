"""Stored reference attention: K/V captured while inverting, replayed while editing.

Pairing is by timestep. Inversion step j runs the model at timestep t on the latent one step
less noisy (its input); edit step i runs at the same t, and the shared reference it would
otherwise compute is exactly that forward pass (see `engine.edit.Reference`). So the K/V a
capture records at t are the ones a recomputed reference row would produce at t, and the edit
batch loses its reference row (2K rows instead of 2K+1).

What is stored per block: K after the key norm and before RoPE, and V, both [heads, tokens,
head_dim] for text and image tokens; RoPE is re-applied on replay (elementwise and cheap, and
the same function on the same bits). `bf16` keeps the model dtype; `fp8` is e4m3 with one
scale per tensor, half the bytes.

On disk (`--attention-store disk`) a store is one safetensors file per timestep and block,
`attention/<store key>/t_0999/b_07.safetensors`; in memory (`cpu`) it lives in pinned host
memory for the life of the process, per block. Captured blocks go to the host on a side stream
and are written by a few threads, so the inversion does not wait for copies or the disk (only,
when the disk is slower, for a bounded queue). Replay reads the blocks of the current and the
next timestep on several threads, and each block goes to the GPU while the one before computes.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from cache.atomic import FileRecord, save_tensors
from cache.keys import stable_hash
from cache.sizes import format_size
from engine.errors import SettingsError

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class StoreSettings:
    """Which timesteps and blocks to capture, where, and in what precision."""

    where: str = "none"  # none | cpu | disk
    window: tuple[float, float] = (0.0, 1.0)  # in edit-step fractions, like --inject-steps
    layers: tuple[int, ...] | None = None
    dtype: str = "model"  # model (bf16 on GPU: exact replay) | bf16 | fp8

    def __post_init__(self) -> None:
        if self.where not in ("none", "cpu", "disk"):
            raise SettingsError(f"--attention-store must be none, cpu or disk, got {self.where!r}")
        if self.dtype not in ("model", "bf16", "fp8"):
            raise SettingsError(f"--attention-dtype must be model, bf16 or fp8, got {self.dtype!r}")

    @property
    def key(self) -> str:
        return stable_hash({"window": self.window, "layers": self.layers, "dtype": self.dtype}, length=16)

    def edit_steps(self, steps: int) -> range:
        start, end = self.window
        return range(round(start * steps), round(end * steps))

    def block_ids(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers)) if self.layers is None else self.layers

    def bytes_needed(self, steps: int, num_layers: int, tokens: int, width: int, model_bytes: int = 2) -> int:
        per_tensor = tokens * width * {"fp8": 1, "bf16": 2}.get(self.dtype, model_bytes)
        return len(self.edit_steps(steps)) * len(self.block_ids(num_layers)) * 2 * per_tensor


def budget_refusal(settings: StoreSettings, steps: int, num_layers: int, tokens: int, width: int, budget: int, model_bytes: int = 2) -> str | None:
    """None when the store fits `budget`; else a one-line refusal that names a window that fits."""
    need = settings.bytes_needed(steps, num_layers, tokens, width, model_bytes)
    if need <= budget:
        return None
    n_steps, n_layers = len(settings.edit_steps(steps)), len(settings.block_ids(num_layers))
    per_block_step = need // max(n_steps * n_layers, 1)
    fit = budget // max(per_block_step, 1)
    if fit >= n_layers:
        hint = f"--attention-steps 0:{(fit // n_layers) / steps:.2f} (first {fit // n_layers} steps, every block)"
    elif fit >= 1:
        hint = f"--attention-layers 0-{fit - 1} with one step (--attention-steps 0:{1 / steps:.2f}), or --attention-dtype fp8"
    else:
        hint = "a larger --attention-budget, or --reference shared (recompute, no storage)"
    return (
        f"stored attention needs {format_size(need)} ({n_steps} steps x {n_layers} blocks x "
        f"{format_size(per_block_step)}) but the budget is {format_size(budget)}: try {hint}"
    )


def default_budget(settings: StoreSettings, cache_dir: Path) -> int:
    """Disk: free space less 10 %; CPU: half the available memory."""
    if settings.where == "disk":
        import shutil

        return int(shutil.disk_usage(cache_dir).free * 0.9)
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def _quantize(x: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    if dtype == "model":
        return {"": x}  # copied to the host by the caller; no second copy on the GPU
    if dtype == "bf16":
        return {"": x.to(torch.bfloat16)}
    scale = x.abs().amax().float().clamp(min=1e-12) / FP8_MAX
    return {"": (x.float() / scale).to(torch.float8_e4m3fn), ".scale": scale.reshape(1)}


def _dequantize(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    x = tensors[name]
    if x.dtype == torch.float8_e4m3fn:
        return (x.float() * tensors[name + ".scale"].float()).to(dtype)
    return x.to(dtype)


# ------------------------------------------------------------------------------------ capture

Sink = Callable[[int, int, dict[str, torch.Tensor], "torch.cuda.Event | None"], None]


class _HostCopies:
    """Copies captured tensors to host memory without holding up the compute stream.

    On CUDA the tensor is snapshotted on the compute stream (the processor ropes K in place
    right after the hook), then copied into pinned memory on a side stream; `ready()` is an
    event after the copies so far. Elsewhere the copy is synchronous.
    """

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None

    def copy(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`x`, computed from the module's `output`, in host memory."""
        if x.device.type != "cuda":
            return x.to("cpu", copy=True)
        if self.stream is None:
            self.stream = torch.cuda.Stream(x.device)
        shared = x.untyped_storage().data_ptr() == output.untyped_storage().data_ptr()
        snap = x.clone(memory_format=torch.contiguous_format) if shared else x.contiguous()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            host = torch.empty(snap.shape, dtype=snap.dtype, pin_memory=True)
            host.copy_(snap, non_blocking=True)
        snap.record_stream(self.stream)  # its memory is not reused before the copy has run
        return host

    def ready(self) -> "torch.cuda.Event | None":
        if self.stream is None:
            return None
        event = torch.cuda.Event(blocking=True)  # the writer threads sleep on it rather than spin
        event.record(self.stream)
        return event


class _TimestepGate:
    """Open for the stored timesteps; gathers each block's K and V and hands the block on."""

    def __init__(self, timesteps: set[int], row: int, sink: Sink, dtype: str) -> None:
        self.timesteps, self.row, self.sink, self.dtype = timesteps, row, sink, dtype
        self.t: int | None = None
        self.host = _HostCopies()
        self.blocks: dict[int, dict[str, torch.Tensor]] = {}

    def add(self, block: int, kind: str, x: torch.Tensor, output: torch.Tensor) -> None:
        tensors = self.blocks.setdefault(block, {})
        for suffix, q in _quantize(x, self.dtype).items():
            tensors[f"{block:02d}.{kind}{suffix}"] = self.host.copy(q, output)
        if {f"{block:02d}.k", f"{block:02d}.v"} <= tensors.keys():
            self.sink(self.t, block, self.blocks.pop(block), self.host.ready())


def _make_hooks(gate: _TimestepGate):
    from diffusers.hooks import ModelHook

    class GateHook(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            t = kwargs.get("timestep")
            t = int(t.flatten()[0]) if torch.is_tensor(t) else t
            gate.t = t if t in gate.timesteps else None
            return args, kwargs

        def post_forward(self, module, output):
            gate.t, gate.blocks = None, {}
            return output

    class CaptureHook(ModelHook):
        def __init__(self, block: int, kind: str, heads: int) -> None:
            super().__init__()
            self.block, self.kind, self.heads = block, kind, heads

        def post_forward(self, module, output):
            if gate.t is not None:
                x = output[gate.row]
                if x.dim() == 2:  # V comes out of to_v as [tokens, heads * head_dim]
                    x = x.view(x.shape[0], self.heads, -1).transpose(0, 1)
                gate.add(self.block, self.kind, x, output)
            return output

    return GateHook, CaptureHook


@contextlib.contextmanager
def kv_capture(
    transformer: torch.nn.Module,
    layers: tuple[int, ...],
    timesteps: set[int],
    sink: Sink,
    *,
    row: int = -1,
    dtype: str = "model",
) -> Iterator[None]:
    """Record K (post-norm) and V of `row` in `layers` at `timesteps`: `sink(t, block, tensors, ready)`
    per block, with host tensors that may be read once `ready` (an event, or None) has passed."""
    from diffusers.hooks import HookRegistry

    gate = _TimestepGate(timesteps, row, sink, dtype)
    GateHook, CaptureHook = _make_hooks(gate)
    registered = [(transformer, "cogedit_kv_gate")]
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(GateHook(), "cogedit_kv_gate")
    for i in layers:
        attn = transformer.transformer_blocks[i].attn1
        for module, kind in ((attn.norm_k, "k"), (attn.to_v, "v")):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(CaptureHook(i, kind, attn.heads), "cogedit_kv_capture")
            registered.append((module, "cogedit_kv_capture"))
    try:
        yield
    finally:
        for module, name in registered:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)


class StoreWriter:
    """Takes captured blocks: writes them on a few threads (disk) or keeps them (cpu).

    At most `depth` blocks wait or are being written at once, so the capture waits for the
    disk rather than hoarding host memory.
    """

    def __init__(self, where: str, directory: Path | None, memory: dict[int, dict[int, dict[str, torch.Tensor]]] | None, workers: int = 4, depth: int = 8) -> None:
        self.directory, self.memory = directory, memory
        self.records: dict[tuple[int, int], FileRecord] = {}
        self.error: BaseException | None = None
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="cogedit-attention-writer") if where == "disk" else None
        self._slots = threading.Semaphore(depth)
        self._ready: torch.cuda.Event | None = None  # cpu: the latest block's copies (one stream: it covers all)

    def __call__(self, t: int, block: int, tensors: dict[str, torch.Tensor], ready: "torch.cuda.Event | None") -> None:
        if self._pool is None:
            self.memory.setdefault(t, {})[block] = tensors
            if ready is not None:
                self._ready = ready
            return
        if self.error is not None:
            raise self.error
        self._slots.acquire()
        self._pool.submit(self._write, t, block, tensors, ready)

    def _write(self, t: int, block: int, tensors: dict[str, torch.Tensor], ready: "torch.cuda.Event | None") -> None:
        try:
            if ready is not None:
                ready.synchronize()
            self.records[(t, block)] = save_tensors(block_path(self.directory, t, block), tensors, {"timestep": str(t), "block": str(block)})
        except BaseException as exc:  # reported to the capture by the next block, or by close()
            self.error = self.error or exc
        finally:
            self._slots.release()

    def close(self) -> dict[tuple[int, int], FileRecord]:
        """Wait for every block; the written files' records by (timestep, block)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        elif self._ready is not None:
            self._ready.synchronize()
        if self.error is not None:
            raise self.error
        return self.records


# The manifest marks per-block stores; a store without the mark (one file per timestep, from an
# older cogedit) reads as absent and is captured again.
STORE_LAYOUT = "per-block"


def block_path(directory: Path, t: int, block: int) -> Path:
    """One file per timestep and block: <store dir>/t_0999/b_07.safetensors."""
    return directory / f"t_{t:04d}" / f"b_{block:02d}.safetensors"


# ------------------------------------------------------------------------------------- replay

# In-memory stores of this process, by (inversion id, store key): timestep -> block -> tensors.
MEMORY_STORES: dict[tuple[str, str], dict[int, dict[int, dict[str, torch.Tensor]]]] = {}

READ_AHEAD = 1  # timesteps read beyond the one being replayed


class _Reader:
    """Reads blocks on a few threads, the timestep being replayed first.

    Not a ThreadPoolExecutor, which runs jobs in submission order: on its first step the edit
    loop asks for step t+1's read-ahead before step t itself, which would then wait behind it.
    """

    def __init__(self, load: Callable[[int, int], dict[str, torch.Tensor]], workers: int) -> None:
        self._load = load
        self._jobs: dict[int, deque[tuple[int, Future]]] = {}  # by timestep, oldest first
        self._first: int | None = None
        self._closed = False
        self._cv = threading.Condition()
        self._threads = [threading.Thread(target=self._work, name=f"cogedit-attention-reader-{n}", daemon=True) for n in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, t: int, blocks: tuple[int, ...]) -> dict[int, Future]:
        futures = {i: Future() for i in blocks}
        with self._cv:
            self._jobs.setdefault(t, deque()).extend(futures.items())
            self._cv.notify_all()
        return futures

    def hurry(self, t: int) -> None:
        with self._cv:
            self._first = t

    def _take(self) -> tuple[int, int, Future] | None:
        with self._cv:
            while not self._jobs and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            t = self._first if self._first in self._jobs else next(iter(self._jobs))
            i, future = self._jobs[t].popleft()
            if not self._jobs[t]:
                del self._jobs[t]
            return t, i, future

    def _work(self) -> None:
        while (job := self._take()) is not None:
            t, i, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self._load(t, i))
                except BaseException as exc:  # raised where the block is waited for
                    future.set_exception(exc)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for jobs in self._jobs.values():
                for _, future in jobs:
                    future.cancel()
            self._jobs.clear()
            self._cv.notify_all()
        for thread in self._threads:
            thread.join()


class StepKV:
    """One timestep's stored K/V on the GPU, one block at a time.

    Holding all blocks of a step on the GPU would cost 9 GB at 49x480x720, so each block's K/V
    moves in on a side stream while the block before it computes, as soon as its file is read,
    and its host copy is let go. A block asked for several times in a row (row groups) is kept
    until the next one is asked for; `close` frees the last. A second pass over the blocks reads
    them again.
    """

    def __init__(
        self,
        blocks: dict[int, Future],
        reread: Callable[[int], Future],
        layers: tuple[int, ...],
        device: str,
        dtype: torch.dtype,
        rotary,
        text_len: int,
        stream: "torch.cuda.Stream | None",
    ) -> None:
        self.layers, self.device, self.dtype = layers, device, dtype
        self.rotary, self.text_len, self.stream = rotary, text_len, stream
        self._blocks, self._reread = blocks, reread
        self._inflight: dict[int, tuple[dict[str, torch.Tensor], object]] = {}
        self._current: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._issue(layers[0], wait=False)

    def _issue(self, i: int, wait: bool) -> None:
        """Start block i's copy to the GPU; unless `wait`, only if its file is read already."""
        if i in self._inflight:
            return
        if i not in self._blocks:
            self._blocks[i] = self._reread(i)
        if not (wait or self._blocks[i].done()):
            return
        # The host copy is let go once the copy is issued: the pinned-memory cache does not reuse
        # it before the copy has run (it records an event for every block, sliced or not).
        raw = self._blocks.pop(i).result()
        if self.stream is None:
            self._inflight[i] = (raw, None)
            return
        with torch.cuda.stream(self.stream):
            moved = {n: x.to(self.device, non_blocking=True) for n, x in raw.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        self._inflight[i] = (moved, event)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        if self._current is not None and self._current[0] == i:
            return self._current[1:]
        self._current = None
        self._issue(i, wait=True)
        moved, event = self._inflight.pop(i)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
            for t in moved.values():  # allocated on the side stream, used on this one
                t.record_stream(torch.cuda.current_stream())
        if (n := self.layers.index(i) + 1) < len(self.layers):
            self._issue(self.layers[n], wait=False)
        k = _dequantize(moved, f"{i:02d}.k", self.dtype).unsqueeze(0)
        v = _dequantize(moved, f"{i:02d}.v", self.dtype).unsqueeze(0)
        if self.rotary is not None:
            k = torch.cat([k[:, :, : self.text_len], apply_rotary_emb(k[:, :, self.text_len :], self.rotary)], dim=2)
        self._current = (i, k, v)
        return k, v

    def close(self) -> None:
        """Free what is still held on the GPU and cancel reads not yet started."""
        self._current = None
        self._inflight.clear()
        for future in self._blocks.values():
            future.cancel()
        self._blocks.clear()


class StoredAttention:
    """Replays a store: `at(t)` gives a `StepKV` for timestep t; `prefetch(t)` reads ahead.

    `load(t, block)` gives one block's tensors (pinned, to be copied to a GPU asynchronously);
    it runs on `workers` threads, so reading, checking and pinning stay off the GPU's path.
    """

    def __init__(
        self,
        layers: tuple[int, ...],
        load: Callable[[int, int], dict[str, torch.Tensor]],
        device: str,
        dtype: torch.dtype,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        text_len: int,
        workers: int | None = None,
    ) -> None:
        self.layers, self.device, self.dtype = layers, device, dtype
        self.rotary, self.text_len = rotary, text_len
        self._stream = torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None
        self._reader = _Reader(load, workers or min(8, os.cpu_count() or 1))
        self._pending: dict[int, dict[int, Future]] = {}
        self._step: StepKV | None = None

    def prefetch(self, t: int) -> None:
        """Start reading timestep t's blocks, unless READ_AHEAD timesteps are read ahead already."""
        if t not in self._pending and len(self._pending) <= READ_AHEAD:
            self._pending[t] = self._reader.submit(t, self.layers)

    def at(self, t: int) -> StepKV:
        """Timestep t's K/V; the blocks are waited for one by one, as the model reaches them."""
        if self._step is not None:
            self._step.close()
        self._reader.hurry(t)
        blocks = self._pending.pop(t, None) or self._reader.submit(t, self.layers)
        self._step = StepKV(blocks, lambda i: self._reader.submit(t, (i,))[i], self.layers, self.device, self.dtype, self.rotary, self.text_len, self._stream)
        return self._step

    def close(self) -> None:
        if self._step is not None:
            self._step.close()
        self._reader.close()
