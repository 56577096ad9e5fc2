"""One engine job at a time, with live progress, cancel, and one-line messages.

A GPU holds one model at a time, so jobs run one after another: Gradio's queue keeps the waiting
ones (and shows each its position); the lock here holds even against a second browser tab. A
job's failure reaches the browser as the engine's one-line message in the page's words, never a
traceback, in a notice of its own (raising gr.Error would mark every panel the job fills as
failed); the server's log keeps the traceback of an unforeseen one. What the engine changed on
its own (fewer frames than asked, a stretched clip) is logged as a warning: it is shown too.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import gradio as gr

from engine.errors import USER_ERRORS, JobCancelled
from engine.report import Reporter

T = TypeVar("T")
log = logging.getLogger("cogedit.ui")


# The command line's flags as the page labels them; a flag with a value in quotes is a choice.
PAGE_LABELS = {
    "frames": "frames", "height": "height", "width": "width", "steps": "steps", "fit": "fit", "source-prompt": "source prompt",
    "inversion": "inversion", "inversion-iters": "inversion refinements", "verify": "verify", "plan": "memory plan", "vram": "memory plan",
    "inject-steps": "injection window", "inject-layers": "injection layers", "inject-strength": "injection strength",
    "guidance": "guidance", "negative-prompt": "negative prompt", "negative-from-source": "'negative prompt = the source prompt'",
    "init": "start from", "seed": "seed", "reference": "reference", "mask-box": "local edit box", "mask-box-end": "box on the last frame", "mask-fit": "'inside the box, change'",
    "mask": "'only around the moving object'",
    "prompt": "prompts", "model": "the app's --model", "attention": "attention kernel",
}
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)(?: (crop|pad|stretch|random|inverted|fixed-point|ddim|shared|per-half|stored|staged|lean|int8|nf4|offload|auto|sdpa|fa4|sage|object)\b)?")
_PATH = re.compile(r"(?<![\w.])/[^\s'\"]+")


def page_words(text: str, folders: tuple[Path, ...] = ()) -> str:
    """A message in the page's words: its labels for the command line's flags, a file in the app's
    `folders` by its name (not the upload's hashed path)."""

    def flag(m: re.Match) -> str:
        label = PAGE_LABELS.get(m[1], m[0])
        return f'{label} "{m[2]}"' if m[2] else label

    def path(m: re.Match) -> str:
        inside = any(m[0].startswith(str(root)) for root in folders)
        return Path(m[0].rstrip(".,;:)")).name + m[0][len(m[0].rstrip(".,;:)")) :] if inside else m[0]

    return _FLAG.sub(flag, _PATH.sub(path, text))


def one_line(exc: BaseException) -> str:
    """What the browser shows for a failure: the engine's message, on one line."""
    text = " ".join(str(exc).split())
    if isinstance(exc, USER_ERRORS):
        return text
    return f"unexpected {type(exc).__name__}: {text} — the server's log has the traceback; please report it"


def notify(title: str, message: str) -> None:
    """A notice in the browser, titled: a cancel is news, anything else a warning toast (never
    gr.Error, which would also mark the panels the handler fills as failed)."""
    (gr.Info if title == "Cancelled" else gr.Warning)(message, title=title)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(log.name):  # the app's own log (a failed job's traceback) stays in the server's
            self.messages.append(" ".join(record.getMessage().split()))


@contextlib.contextmanager
def engine_warnings() -> Iterator[list[str]]:
    """The engine's warnings while the block runs (the job holds the lock: they are its own)."""
    handler, logger = _Collect(), logging.getLogger("cogedit")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


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
    def __init__(self, device: str, folders: tuple[Path, ...] = ()) -> None:
        self.device, self.folders = device, folders
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._owner: str | None = None  # the session whose job runs

    def run(self, job: Callable[[Reporter], T], progress: Callable[..., None], session: str) -> tuple[T | None, list[str]]:
        """`job(reporter)` alone, reporting to `progress` (a gr.Progress): its result (None when it
        failed or was cancelled, which a notice says) and the engine's warnings, in the page's words;
        each warning is a notice too."""
        with self._lock, engine_warnings() as notes:
            self._cancel.clear()
            self._owner = session
            result = None
            try:
                result = job(Reporter(device=self.device, listener=Progress(progress, self._cancel)))
            except Exception as exc:
                if not isinstance(exc, USER_ERRORS):
                    log.exception("job failed")
                self.notify("Cancelled" if isinstance(exc, JobCancelled) else "Error", one_line(exc))
            finally:
                self._owner = None
            shown = [page_words(n, self.folders) for n in dict.fromkeys(notes)]
            for note in shown:
                notify("Note", note)
            return result, shown

    def notify(self, title: str, message: str) -> None:
        """`message` as a notice, in the page's words."""
        notify(title, page_words(message, self.folders))

    def cancel(self, session: str) -> str:
        """Stop this session's running job at its next step."""
        if self._owner != session:
            return "nothing of yours is running"
        self._cancel.set()
        return "cancelling at the next step…"
