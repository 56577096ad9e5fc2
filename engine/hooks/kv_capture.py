"""Capturing reference K/V while the transformer runs, as diffusers hooks, and writing them out.

What is captured per block: K after the key norm and before RoPE, and V, both [heads, tokens,
head_dim] for text and image tokens of one batch row; RoPE is re-applied on replay
(`engine.hooks.kv_replay`). `bf16` keeps the model dtype; `fp8` is e4m3 with one scale per tensor,
half the bytes. Captured blocks go to the host on a side stream and are written by a few
threads, so the inversion does not wait for copies or the disk (only, when the disk is slower,
for a bounded queue).

The shared attention processor records K and V (`CaptureSlot`), switched on for a block by the
block's own hook, outside the compiled block: hooks on `norm_k` and `to_v` made each block's
modules their own objects to dynamo, so every compiled block was a new graph (issue 17).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from cache.atomic import FileRecord, save_tensors
from engine.hooks import registry as hooks
from engine.hooks.injection import CaptureSlot, shared_processor
from engine.hooks.registry import ModelHook

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _quantize(x: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    if dtype == "model":
        return {"": x}  # copied to the host by the caller; no second copy on the GPU
    if dtype == "bf16":
        return {"": x.to(torch.bfloat16)}
    scale = x.abs().amax().float().clamp(min=1e-12) / FP8_MAX
    return {"": (x.float() / scale).to(torch.float8_e4m3fn), ".scale": scale.reshape(1)}


Sink = Callable[[int, int, int, dict[str, torch.Tensor], "torch.cuda.Event | None"], None]  # (t, window, block, tensors, ready)


class _HostCopies:
    """Copies captured tensors to host memory without holding up the compute stream.

    On CUDA the tensor is copied into pinned memory on a side stream; `ready()` is an event
    after the copies so far. Elsewhere the copy is synchronous.
    """

    def __init__(self) -> None:
        self.stream: torch.cuda.Stream | None = None

    def copy(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in host memory (nothing writes into `x` after the processor handed it over)."""
        if x.device.type != "cuda":
            return x.to("cpu", copy=True)
        if self.stream is None:
            self.stream = torch.cuda.Stream(x.device)
        snap = x.contiguous()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            host = torch.empty(snap.shape, dtype=snap.dtype, pin_memory=True)
            host.copy_(snap, non_blocking=True)
        snap.record_stream(self.stream)  # its memory is not reused before the copy has run
        return host

    def ready(self) -> torch.cuda.Event | None:
        if self.stream is None:
            return None
        event = torch.cuda.Event(blocking=True)  # the writer threads sleep on it rather than spin
        event.record(self.stream)
        return event


class _TimestepGate:
    """Open for the stored timesteps; hands each block's K and V on."""

    def __init__(self, timesteps: set[int], sink: Sink, dtype: str, windows: int) -> None:
        self.timesteps, self.sink, self.dtype, self.windows = timesteps, sink, dtype, windows
        self.t: int | None = None
        self.window = 0
        self.seen: dict[int, int] = {}  # captured forwards by timestep
        self.host = _HostCopies()

    def add(self, block: int, k: torch.Tensor, v: torch.Tensor) -> None:
        tensors = {}
        for kind, x in (("k", k), ("v", v)):
            for suffix, q in _quantize(x, self.dtype).items():
                tensors[f"{block:02d}.{kind}{suffix}"] = self.host.copy(q)
        self.sink(self.t, self.window, block, tensors, self.host.ready())


KV_CAPTURE = "cogedit_kv_capture"


class CaptureGateHook(ModelHook):
    """On the transformer: opens the gate for the forward passes at a stored timestep."""

    def __init__(self, gate: _TimestepGate) -> None:
        super().__init__()
        self.gate = gate

    def pre_forward(self, module, *args, **kwargs):
        t = kwargs.get("timestep")
        t = int(t.flatten()[0]) if torch.is_tensor(t) else t
        # Only the first forward at t, or with windows the first of each (a step predicts its
        # windows in order before anything else): it is the one a shared reference row repeats
        # (the fixed-point refinements of the same step run at t again, on other latents).
        n = self.gate.seen.get(t, 0)
        self.gate.t = t if t in self.gate.timesteps and n < self.gate.windows else None
        self.gate.window = n
        return args, kwargs

    def post_forward(self, module, output):
        if self.gate.t is not None:
            self.gate.seen[self.gate.t] = self.gate.window + 1
        self.gate.t = None
        return output


class KVCaptureHook(ModelHook):
    """On a captured block: switches the shared processor's recording on around the block's
    forwards at a stored timestep, and hands what it recorded to the gate."""

    def __init__(self, gate: _TimestepGate, block: int, slot: CaptureSlot) -> None:
        super().__init__()
        self.gate, self.block, self.slot = gate, block, slot

    def pre_forward(self, module, *args, **kwargs):
        self.slot.on = self.gate.t is not None
        return args, kwargs

    def post_forward(self, module, output):
        slot = self.slot
        if slot.on:
            self.gate.add(self.block, slot.k, slot.v)
        slot.on, slot.k, slot.v = False, None, None
        return output


@dataclass(frozen=True)
class KVCaptureConfig:
    """Record K and V of batch row `row` in blocks `layers` at `timesteps`, in the first `windows`
    forwards at each (a long clip's windows, in order): `sink(t, window, block, tensors, ready)`
    per block, with host tensors that may be read once `ready` (an event, or None) has passed."""

    layers: tuple[int, ...]
    timesteps: frozenset[int]
    sink: Sink
    row: int = -1
    dtype: str = "model"
    windows: int = 1


def apply_kv_capture(transformer: torch.nn.Module, config: KVCaptureConfig) -> None:
    gate = _TimestepGate(set(config.timesteps), config.sink, config.dtype, config.windows)
    slot = CaptureSlot(row=config.row)
    shared_processor(transformer).capture = slot
    hooks.register(transformer, CaptureGateHook(gate), KV_CAPTURE)
    for i in config.layers:
        hooks.register(transformer.transformer_blocks[i], KVCaptureHook(gate, i, slot), KV_CAPTURE)


def remove_kv_capture(transformer: torch.nn.Module) -> None:
    hooks.remove(transformer, KV_CAPTURE)
    shared_processor(transformer).capture = CaptureSlot()


class StoreWriter:
    """Takes captured blocks: writes them on a few threads (disk) or keeps them (cpu).

    At most `depth` blocks wait or are being written at once, so the capture waits for the
    disk rather than hoarding host memory.
    """

    def __init__(
        self, where: str, path_of: Callable[[int, int, int], Path] | None, memory: Callable[[int], dict[int, dict[int, dict[str, torch.Tensor]]]] | None, workers: int = 4, depth: int = 8
    ) -> None:
        """`path_of(t, window, block)`: a block's file (disk); `memory(window)`: a window's steps (cpu)."""
        self.path_of, self.memory = path_of, memory
        self.records: dict[tuple[int, int, int], FileRecord] = {}
        self.error: BaseException | None = None
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="cogedit-attention-writer") if where == "disk" else None
        self._slots = threading.Semaphore(depth)
        self._ready: torch.cuda.Event | None = None  # cpu: the latest block's copies (one stream: it covers all)

    def __call__(self, t: int, window: int, block: int, tensors: dict[str, torch.Tensor], ready: torch.cuda.Event | None) -> None:
        if self._pool is None:
            self.memory(window).setdefault(t, {})[block] = tensors
            if ready is not None:
                self._ready = ready
            return
        if self.error is not None:
            raise self.error
        self._slots.acquire()
        self._pool.submit(self._write, t, window, block, tensors, ready)

    def _write(self, t: int, window: int, block: int, tensors: dict[str, torch.Tensor], ready: torch.cuda.Event | None) -> None:
        try:
            if ready is not None:
                ready.synchronize()
            self.records[(t, window, block)] = save_tensors(self.path_of(t, window, block), tensors, {"timestep": str(t), "block": str(block), "window": str(window)})
        except BaseException as exc:  # reported to the capture by the next block, or by close()
            self.error = self.error or exc
        finally:
            self._slots.release()

    def close(self) -> dict[tuple[int, int, int], FileRecord]:
        """Wait for every block; the written files' records by (timestep, window, block)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        elif self._ready is not None:
            self._ready.synchronize()
        if self.error is not None:
            raise self.error
        return self.records
