"""Replaying stored reference K/V while editing: read on threads, copied to the GPU ahead of use.

Replay reads the blocks of the current and the next timestep on several threads, and each
block goes to the GPU on a side stream while the one before computes.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import torch


def _dequantize(tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    x = tensors[name]
    if x.dtype == torch.float8_e4m3fn:
        return (x.float() * tensors[name + ".scale"].float()).to(dtype)
    return x.to(dtype)


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
        stream: torch.cuda.Stream | None,
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
