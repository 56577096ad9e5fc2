"""One engine job at a time, with live progress, cancel, and one-line errors.

A GPU holds one model at a time, so jobs run one after another: Gradio's queue keeps the waiting
ones (and shows each its position); the lock here holds even against a second browser tab. A
job's failure reaches the browser as the engine's one-line message, never a traceback; the
server's log keeps the traceback of an unforeseen one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import gradio as gr

from engine.errors import USER_ERRORS, JobCancelled
from engine.report import Reporter

T = TypeVar("T")
log = logging.getLogger("cogedit.ui")


def one_line(exc: BaseException) -> str:
    """What the browser shows for a failure: the engine's message, on one line."""
    text = " ".join(str(exc).split())
    if isinstance(exc, USER_ERRORS):
        return text
    return f"unexpected {type(exc).__name__}: {text} — the server's log has the traceback; please report it"


class Progress:
    """A Reporter listener that shows phase, step and time left in the browser and stops the job
    at the next step once cancel is set."""

    def __init__(self, show: Callable[..., None], cancel: threading.Event) -> None:
        self._show, self._cancel = show, cancel
        self._phase, self._start, self._start_done = "", 0.0, 0

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if self._cancel.is_set():
            raise JobCancelled("cancelled: the steps already finished are cached; run it again to resume")
        now = time.monotonic()
        if phase != self._phase or done < self._start_done:
            self._phase, self._start, self._start_done = phase, now, done
        if not total:
            self._show(None, desc=phase)
            return
        left = ""
        if done > self._start_done:  # time left from this phase's own pace
            left = f", {(now - self._start) / (done - self._start_done) * (total - done):.0f} s left"
        self._show(done / total, desc=f"{phase}: step {done}/{total}{left}")


class JobRunner:
    def __init__(self, device: str) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._owner: str | None = None  # the session whose job runs

    def run(self, job: Callable[[Reporter], T], progress: Callable[..., None], session: str) -> T:
        """`job(reporter)` alone, reporting to `progress` (a gr.Progress); failures become gr.Error."""
        with self._lock:
            self._cancel.clear()
            self._owner = session
            try:
                return job(Reporter(device=self.device, listener=Progress(progress, self._cancel)))
            except Exception as exc:
                if not isinstance(exc, USER_ERRORS):
                    log.exception("job failed")
                raise gr.Error(one_line(exc), title="Cancelled" if isinstance(exc, JobCancelled) else "Error", print_exception=False) from None
            finally:
                self._owner = None

    def cancel(self, session: str) -> str:
        """Stop this session's running job at its next step."""
        if self._owner != session:
            return "nothing of yours is running"
        self._cancel.set()
        return "cancelling at the next step…"
