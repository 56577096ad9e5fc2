"""Progress bars per phase and the closing summary table (phase, time, peak memory, cache hit).

The engine reports through a `Reporter`; the CLI gives it a rich console, the Python API a
silent one, the web app a listener that mirrors each phase's progress in the browser. Peak
memory is the GPU's allocator peak on CUDA and the process's peak RSS on CPU.
"""

from __future__ import annotations

import contextlib
import gc
import re
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from engine.errors import GPUOutOfMemoryError


@dataclass
class PhaseRecord:
    name: str
    seconds: float = 0.0
    peak_bytes: int = 0
    peak_reserved: int = 0  # CUDA allocator's reserved peak (0 on CPU)
    cache_hit: bool | None = None  # None: the phase has nothing to cache
    detail: str = ""
    advances: list[float] = field(default_factory=list)  # seconds since the start at each advance (each step)


def _reset_cpu_peak() -> None:
    # Writing 5 to clear_refs resets the kernel's peak-RSS counter (Linux); elsewhere keep the max.
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")


def _cpu_peak() -> int:
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _oom_message(phase: str, exc: BaseException) -> str:
    # PyTorch's message reads "... Tried to allocate 2.00 GiB. GPU 0 has a total capacity of ..."
    asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", str(exc))
    need = f" (it asked for {asked.group(1)} more)" if asked else ""
    return (
        f"the GPU ran out of memory in the {phase} phase{need}; finished work is cached "
        "— run again with a smaller memory plan: --plan lean or --plan offload (or --vram with your card's size)"
    )


# Called with (phase name, steps done, total steps or None) when a phase starts and at every step.
Listener = Callable[[str, int, "int | None"], None]


def progress_view(console: object) -> object:
    """The rich Progress every bar of cogedit is drawn in: phase name, bar, count, times."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class Phase:
    """Handle given to the code inside a phase: advance its bar, mark a cache hit."""

    def __init__(
        self, record: PhaseRecord, progress: object | None, task: int | None, listener: Listener | None = None, total: int | None = None, cuda: bool = False
    ) -> None:
        self.record = record
        self._progress = progress
        self._task = task
        self._listener = listener
        self._cuda = cuda
        self._start = time.perf_counter()
        self.done, self.steps = 0, total
        self._tell()

    def _tell(self) -> None:
        if self._listener is not None:
            self._listener(self.record.name, self.done, self.steps)

    def total(self, n: int, done: int = 0) -> None:
        self.done, self.steps = done, n
        if self._progress is not None:
            self._progress.update(self._task, total=n, completed=done)
        self._tell()

    def advance(self, n: int = 1) -> None:
        if self._cuda:  # a step's time is its GPU work's (the queue runs ahead of the host otherwise)
            torch.cuda.synchronize()
        self.record.advances.append(time.perf_counter() - self._start)
        self.done += n
        if self._progress is not None:
            self._progress.advance(self._task, n)
        self._tell()

    def hit(self, value: bool = True, detail: str = "") -> None:
        self.record.cache_hit = value
        if detail:
            self.record.detail = detail


class Reporter:
    """Collects phase records; shows bars when given a rich console, or adds them to `progress`,
    a running rich Progress that several reporters share (a batch's one view), and tells
    `listener` each phase's progress (a listener that raises stops the run there: the web app's
    cancel)."""

    def __init__(self, console: object | None = None, device: str = "cpu", listener: Listener | None = None, progress: object | None = None) -> None:
        self.console = console
        self.device = device
        self.listener = listener
        self.progress = progress
        self.records: list[PhaseRecord] = []

    @property
    def memory_label(self) -> str:
        return "peak VRAM" if self.device.startswith("cuda") else "peak RSS"

    @contextlib.contextmanager
    def phase(self, name: str, total: int | None = None) -> Iterator[Phase]:
        record = PhaseRecord(name)
        self.records.append(record)
        cuda = self.device.startswith("cuda") and torch.cuda.is_available()
        if cuda:
            # The last phase's component can linger in a reference cycle (diffusers' hooks make
            # them) until a collection; collect now so this phase's peak is its own.
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_cpu_peak()
        progress, task, own = self.progress, None, False
        if progress is None and self.console is not None:
            progress, own = progress_view(self.console), True
            progress.start()
        if progress is not None:
            task = progress.add_task(name, total=total)
        start = time.perf_counter()
        failed = True
        try:
            handle = Phase(record, progress, task, self.listener, total, cuda)
            yield handle
            failed = False
        except torch.cuda.OutOfMemoryError as exc:
            raise GPUOutOfMemoryError(_oom_message(name, exc)) from exc
        finally:
            if cuda:
                torch.cuda.synchronize()
                record.peak_bytes = torch.cuda.max_memory_allocated()
                record.peak_reserved = torch.cuda.max_memory_reserved()
            else:
                record.peak_bytes = _cpu_peak()
            record.seconds = time.perf_counter() - start
            if progress is not None and not own:
                progress.remove_task(task)  # the shared view keeps only what is running
            elif progress is not None:
                if failed:  # the error's one line says what happened; a stopped bar would only add noise
                    progress.live.transient = True
                elif progress.tasks[0].total is None:
                    progress.update(task, total=1, completed=1)
                progress.stop()

    def table(self, title: str = "cogedit") -> object:
        from rich.table import Table

        from cache.sizes import format_size

        table = Table(title=title, title_justify="left")
        table.add_column("phase")
        table.add_column("time", justify="right")
        table.add_column(self.memory_label, justify="right")
        table.add_column("cache")
        table.add_column("detail", overflow="fold")
        for r in self.records:
            cache = "" if r.cache_hit is None else ("hit" if r.cache_hit else "miss")
            table.add_row(r.name, f"{r.seconds:.1f} s", format_size(r.peak_bytes), cache, r.detail)
        total = sum(r.seconds for r in self.records)
        peak = max((r.peak_bytes for r in self.records), default=0)
        table.add_row("[bold]total", f"[bold]{total:.1f} s", f"[bold]{format_size(peak)}", "", "")
        return table
