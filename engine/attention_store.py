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

On disk (`--attention-store disk`) a store is one safetensors shard per timestep under
`attention/<store key>/t_0999.safetensors`; in memory (`cpu`) it lives in pinned host memory
for the life of the process. Shards are written by a background thread, so the inversion does
not wait for the disk, and read one timestep ahead while the current step computes.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
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


class _TimestepGate:
    """Transformer-level hook: opens the capture for the timesteps that are stored."""

    def __init__(self, timesteps: set[int], row: int, sink: Callable[[int, dict[str, torch.Tensor]], None], dtype: str) -> None:
        self.timesteps, self.row, self.sink, self.dtype = timesteps, row, sink, dtype
        self.t: int | None = None
        self.buffer: dict[str, torch.Tensor] = {}


def _make_hooks(gate: _TimestepGate):
    from diffusers.hooks import ModelHook

    class GateHook(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            t = kwargs.get("timestep")
            t = int(t.flatten()[0]) if torch.is_tensor(t) else t
            gate.t = t if t in gate.timesteps else None
            return args, kwargs

        def post_forward(self, module, output):
            if gate.t is not None:
                gate.sink(gate.t, gate.buffer)
            gate.t, gate.buffer = None, {}
            return output

    class CaptureHook(ModelHook):
        def __init__(self, name: str, heads: int) -> None:
            super().__init__()
            self.name, self.heads = name, heads

        def post_forward(self, module, output):
            if gate.t is not None:
                x = output[gate.row]
                if x.dim() == 2:  # V comes out of to_v as [tokens, heads * head_dim]
                    x = x.view(x.shape[0], self.heads, -1).transpose(0, 1)
                for suffix, t in _quantize(x, gate.dtype).items():
                    gate.buffer[self.name + suffix] = t.to("cpu", copy=True)  # a copy: the processor ropes K in place next
            return output

    return GateHook, CaptureHook


@contextlib.contextmanager
def kv_capture(
    transformer: torch.nn.Module,
    layers: tuple[int, ...],
    timesteps: set[int],
    sink: Callable[[int, dict[str, torch.Tensor]], None],
    *,
    row: int = -1,
    dtype: str = "model",
) -> Iterator[None]:
    """Record K (post-norm) and V of `row` in `layers` at `timesteps`; `sink(t, tensors)` per call."""
    from diffusers.hooks import HookRegistry

    gate = _TimestepGate(timesteps, row, sink, dtype)
    GateHook, CaptureHook = _make_hooks(gate)
    registered = [(transformer, "cogedit_kv_gate")]
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(GateHook(), "cogedit_kv_gate")
    for i in layers:
        attn = transformer.transformer_blocks[i].attn1
        for module, kind in ((attn.norm_k, "k"), (attn.to_v, "v")):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(CaptureHook(f"{i:02d}.{kind}", attn.heads), "cogedit_kv_capture")
            registered.append((module, "cogedit_kv_capture"))
    try:
        yield
    finally:
        for module, name in registered:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)


class ShardWriter:
    """Writes captured shards on a background thread (disk) or keeps them in memory (cpu)."""

    def __init__(self, where: str, directory: Path | None, memory: dict[int, dict[str, torch.Tensor]] | None) -> None:
        self.where, self.directory, self.memory = where, directory, memory
        self.records: dict[int, FileRecord] = {}
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=2)  # bounded: capture waits rather than hoard memory
        self._thread = threading.Thread(target=self._run, name="cogedit-attention-writer", daemon=True)
        if where == "disk":
            self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            t, tensors = item
            try:
                self.records[t] = save_tensors(shard_path(self.directory, t), tensors, {"timestep": str(t)})
            except BaseException as exc:  # reported to the caller by close()
                self.error = exc

    def __call__(self, t: int, tensors: dict[str, torch.Tensor]) -> None:
        if self.where == "cpu":
            self.memory[t] = {k: v.pin_memory() if torch.cuda.is_available() else v for k, v in tensors.items()}
        else:
            if self.error is not None:
                raise self.error
            self._queue.put((t, dict(tensors)))

    def close(self) -> dict[int, FileRecord]:
        if self.where == "disk":
            self._queue.put(None)
            self._thread.join()
            if self.error is not None:
                raise self.error
        return self.records


def shard_path(directory: Path, t: int) -> Path:
    return directory / f"t_{t:04d}.safetensors"


# ------------------------------------------------------------------------------------- replay

# In-memory stores of this process, by (inversion id, store key).
MEMORY_STORES: dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]] = {}


class StepKV:
    """One timestep's stored K/V, copied to the GPU one block ahead of use.

    Holding all blocks of a step on the GPU would cost 9 GB at 49x480x720, so each block's K/V
    moves in on a side stream while the block before it computes, and is freed after use.
    """

    def __init__(self, raw: dict[str, torch.Tensor], layers: tuple[int, ...], device: str, dtype: torch.dtype, rotary, text_len: int) -> None:
        self.raw, self.layers, self.device, self.dtype = raw, layers, device, dtype
        self.rotary, self.text_len = rotary, text_len
        self.cuda = torch.device(device).type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._inflight: dict[int, tuple[dict[str, torch.Tensor], object]] = {}
        self._issue(layers[0])

    def _issue(self, i: int) -> None:
        if i in self._inflight:
            return
        names = [n for n in self.raw if n.startswith(f"{i:02d}.")]
        if not self.cuda:
            self._inflight[i] = ({n: self.raw[n] for n in names}, None)
            return
        with torch.cuda.stream(self.stream):
            moved = {n: self.raw[n].to(self.device, non_blocking=True) for n in names}
            event = torch.cuda.Event()
            event.record(self.stream)
        self._inflight[i] = (moved, event)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        self._issue(i)
        moved, event = self._inflight.pop(i)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
            for t in moved.values():  # allocated on the side stream, used on this one
                t.record_stream(torch.cuda.current_stream())
        # The next block (wrapping round for the next group of rows) starts copying now.
        self._issue(self.layers[(self.layers.index(i) + 1) % len(self.layers)])
        k = _dequantize(moved, f"{i:02d}.k", self.dtype).unsqueeze(0)
        v = _dequantize(moved, f"{i:02d}.v", self.dtype).unsqueeze(0)
        if self.rotary is not None:
            k = torch.cat([k[:, :, : self.text_len], apply_rotary_emb(k[:, :, self.text_len :], self.rotary)], dim=2)
        return k, v


class StoredAttention:
    """Replays a store: `at(t)` gives a `StepKV` for timestep t; `prefetch` reads ahead."""

    def __init__(
        self,
        layers: tuple[int, ...],
        load: Callable[[int], dict[str, torch.Tensor]],
        device: str,
        dtype: torch.dtype,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        text_len: int,
    ) -> None:
        self.layers, self._load, self.device, self.dtype = layers, load, device, dtype
        self.rotary, self.text_len = rotary, text_len
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cogedit-attention-reader")
        self._pending: dict[int, Future] = {}

    def _read(self, t: int) -> dict[str, torch.Tensor]:
        raw = self._load(t)
        if torch.cuda.is_available() and torch.device(self.device).type == "cuda":
            # Pinned pages make the per-block copies asynchronous; done here, off the GPU's path.
            raw = {k: v if v.is_pinned() else v.pin_memory() for k, v in raw.items()}
        return raw

    def prefetch(self, t: int) -> None:
        if t not in self._pending:
            self._pending[t] = self._pool.submit(self._read, t)

    def at(self, t: int) -> StepKV:
        self.prefetch(t)
        return StepKV(self._pending.pop(t).result(), self.layers, self.device, self.dtype, self.rotary, self.text_len)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
