"""Video input: probe a source file, pick the frames the model sees, decode them at model size.

Frame selection follows upstream CogVideo's DDIM-inversion script (drop skipped frames, subsample,
cap, keep the first 4k+1 because the VAE compresses time 4x). Every decord call runs in a child
interpreter (one per probe or read): decord can segfault, abort or spin forever in native code
(holding the GIL) on damaged files, and only a separate process can be killed and reported as a
VideoError.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import queue
import re
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.errors import SettingsError, VideoError

MIN_FRAMES = 5  # smallest 4k+1 count that still has motion (2 latent frames)
FITS = ("stretch", "crop", "pad")
# Under --fit stretch, an aspect ratio changed by more than this is worth a warning.
ASPECT_TOLERANCE = 0.10

log = logging.getLogger("cogedit")


# Frames per get_batch call: bounds decord's intermediate buffers however many frames are asked for.
DECODE_CHUNK = 16
# Generous: opening a long file reads its whole packet index; a hang is the only thing these catch.
PROBE_TIMEOUT_S = 120.0
DECODE_TIMEOUT_S = 300.0
DECODE_TIMEOUT_PER_FRAME_S = 10.0  # a far seek decodes up to one GOP, slow for 4K sources

_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class FrameSettings:
    """Which frames of the source to use and the size they are decoded at (the model's)."""

    max_frames: int | None = 49  # upstream's max_num_frames is 81; the CLI defaults to 49; None: all
    skip_start: int = 0
    skip_end: int = 0
    stride: int | None = None  # None = spread evenly over the kept range
    height: int = 480
    width: int = 720
    # How a source of another aspect ratio meets height x width: stretch it (upstream's way),
    # crop it to fill the frame, or pad it with black bars.
    fit: str = "stretch"
    # Frames per second to read at (every (source fps / fps)-th frame); None: the source's rate.
    # `engine.workflow` sets the model's rate for --frames all.
    fps: float | None = None

    def __post_init__(self) -> None:
        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.max_frames is not None and (not is_int(self.max_frames) or self.max_frames < MIN_FRAMES):
            raise SettingsError(
                f"--frames {self.max_frames!r} is too small — use at least {MIN_FRAMES} "
                f"(a 4k+1 count such as 49)"
            )
        for flag, value in (("--skip-start", self.skip_start), ("--skip-end", self.skip_end)):
            if not is_int(value) or value < 0:
                raise SettingsError(f"{flag} {value!r} is invalid — use a whole number >= 0")
        if self.stride is not None and (not is_int(self.stride) or self.stride < 1):
            raise SettingsError(
                f"--stride {self.stride!r} is invalid — use a whole number >= 1, or leave it out "
                f"to spread frames evenly"
            )
        for flag, value in (("--height", self.height), ("--width", self.width)):
            if not is_int(value) or value <= 0 or value % 16:
                raise SettingsError(
                    f"{flag} {value!r} is invalid — use a positive multiple of 16 "
                    f"(CogVideoX-5B: --height 480 --width 720)"
                )
        if self.fit not in FITS:
            raise SettingsError(f"--fit {self.fit!r} is invalid — use {', '.join(FITS)}")
        if self.fps is not None and not (isinstance(self.fps, int | float) and 0 < self.fps <= 240):
            raise SettingsError(f"--fps {self.fps!r} is invalid — use a frame rate above 0, such as 8")
        if self.fps is not None and self.stride is not None:
            raise SettingsError("give --fps or --stride, not both (each sets which frames are read)")


@dataclass(frozen=True)
class VideoInfo:
    """Facts about the SOURCE file (not the selected frames)."""

    path: str
    sha256: str
    num_frames: int
    fps: float
    width: int
    height: int


def _largest_4k1(count: int) -> int:
    """Largest 4k+1 <= count (0 if count < 1)."""
    return (count - 1) // 4 * 4 + 1 if count >= 1 else 0


def _at_rate(start: int, end: int, fps: float | None, source_fps: float | None) -> range | list[int]:
    """The frames of [start, end) read at `fps` (every source_fps/fps-th, rounded); all of them
    when no rate is asked for or the source is slower."""
    if fps is None or not source_fps or source_fps <= fps:
        return range(start, end)
    step = source_fps / fps
    return [start + round(k * step) for k in range(math.ceil((end - start) / step)) if start + round(k * step) < end]


def output_frames(indices: list[int]) -> int:
    """The real frames of a selection: the repeats `select_frame_indices` pads with are not."""
    n = len(indices)
    while n > 1 and indices[n - 1] == indices[n - 2]:
        n -= 1
    return n


def select_frame_indices(num_frames: int, settings: FrameSettings, source_fps: float | None = None) -> list[int]:
    """Pure function: which source frames to use, in order. With `settings.fps` (and the source's
    `source_fps`) the frames are first taken at that rate; `max_frames` None keeps them all,
    the last one repeated up to a 4k+1 count (`output_frames` says how many are real)."""
    if num_frames < 1:
        raise VideoError(
            f"the video has {num_frames} frames — use a video with at least {MIN_FRAMES} frames"
        )
    start = min(settings.skip_start, num_frames)
    end = max(start, num_frames - settings.skip_end)
    candidates = _at_rate(start, end, settings.fps, source_fps)
    kept = len(candidates)
    # Aim straight at a 4k+1 cap so an even spread still reaches the end of the kept range
    # (spreading max_frames and then trimming to 4k+1 would cut off the tail instead).
    cap = _largest_4k1(settings.max_frames) if settings.max_frames is not None else None

    if settings.stride is not None:
        indices = list(range(start, end, settings.stride))[:cap]
    elif cap is not None and kept > cap:
        # round(linspace(0, kept - 1, cap)) in exact integer arithmetic (round half up).
        span, steps = kept - 1, cap - 1
        indices = [candidates[(2 * i * span + steps) // (2 * steps)] for i in range(cap)]
    else:
        indices = list(candidates)
    if cap is None and len(indices) >= MIN_FRAMES:
        return indices + indices[-1:] * ((1 - len(indices)) % 4)

    usable = _largest_4k1(len(indices))
    if usable < MIN_FRAMES:
        stride = settings.stride if settings.stride != 1 else None  # stride 1 can't go lower
        options = (("--skip-start", settings.skip_start), ("--skip-end", settings.skip_end),
                   ("--stride", stride))
        used = [(flag, value) for flag, value in options if value]
        after = " after " + ", ".join(f"{flag} {value}" for flag, value in used) if used else ""
        fix = ("lower " + "/".join(flag for flag, _ in used) + " or use a longer video"
               if used else f"use a video with at least {MIN_FRAMES} frames")
        raise VideoError(
            f"only {len(indices)} of {num_frames} frames remain{after}; the model needs at least "
            f"{MIN_FRAMES} (a 4k+1 count) — {fix}"
        )
    return indices[:usable]


def _reencode_hint(path: str) -> str:
    quoted = shlex.quote(path)
    return f"re-encode it with ffmpeg -i {quoted} -c:v libx264 -pix_fmt yuv420p fixed.mp4"


def _sha256_file(path: Path, shown: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
    except OSError as exc:
        raise VideoError(
            f"{shown} cannot be read ({exc.strerror or exc}) — check its permissions"
        ) from exc
    return digest.hexdigest()


def check_video_file(path: str | os.PathLike) -> None:
    """The cheap checks of a video path (exists, a regular file, not empty), before any work."""
    _check_file(Path(os.fspath(path)), os.fspath(path))


def _check_file(path: Path, shown: str) -> os.stat_result:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise VideoError(f"{shown} does not exist — check the path") from None
    except OSError as exc:
        reason = exc.strerror or exc
        raise VideoError(f"{shown} cannot be accessed ({reason}) — check the path") from exc
    if stat.S_ISDIR(st.st_mode):
        raise VideoError(f"{shown} is a directory — pass the path of one video file")
    if not stat.S_ISREG(st.st_mode):
        raise VideoError(f"{shown} is not a regular file — pass the path of one video file")
    if st.st_size == 0:
        raise VideoError(f"{shown} is empty (0 bytes) — pass a complete video file")
    return st


@functools.lru_cache(maxsize=1)
def _worker_source() -> str:
    # Run as `python -c`: the child imports only what that file imports, not torch or the engine.
    return (Path(__file__).with_name("decord_worker.py")).read_text(encoding="utf-8")


# decord prefixes messages with "[12:00:00] /src/video_reader.cc:430: " and sometimes "[file]".
_DECORD_PREFIX = re.compile(r"^(\[[\d:]+\]\s+\S+:\d+:\s*)?(\[[^\]]*\])?\s*")
# ffmpeg's own log lines: "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55d0...] moov atom not found".
_FFMPEG_LINE = re.compile(r"^\[[^\]@]+ @ 0x[0-9a-f]+\]\s*(.+)$", re.MULTILINE)
# decord wordings that say only "ffmpeg failed"; ffmpeg's log line says why.
_GENERIC = ("Error reading", "av_read_frame failed", "Error sending packet", "Check failed")


def _one_line(text: str, limit: int = 160) -> str:
    """First meaningful line of a message, without decord's location prefix, cut to limit."""
    for line in text.splitlines():
        line = _DECORD_PREFIX.sub("", line.strip(), count=1).rstrip(". ")
        if line:
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


def _detail(reply: dict) -> str:
    """The most useful one-line reason from a failed worker reply: decord's, or ffmpeg's."""
    detail = _one_line(reply.get("error", ""))
    ffmpeg_lines = _FFMPEG_LINE.findall(reply.get("stderr", ""))
    if ffmpeg_lines and (not detail or any(word in detail for word in _GENERIC)):
        detail = _one_line(ffmpeg_lines[-1])
    return detail or "no details"


class _Worker:
    """A child interpreter running engine/video/decord_worker.py, so that a crash or hang inside decord's native
    code ends that child, never the caller. One child serves the probe and the decode of a file."""

    def __init__(self, shown: str) -> None:
        self.shown = shown
        # A file, not a pipe: ffmpeg can log a lot on damaged input, and nobody drains a pipe.
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _worker_source()],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                encoding="utf-8",
                errors="replace",
            )
        except OSError as exc:
            self._stderr.close()
            raise VideoError(
                f"could not start a Python process to read {shown} ({exc}) — check that "
                f"{sys.executable} runs"
            ) from exc
        # Replies are read on a thread so that waiting for one can time out.
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._pump = threading.Thread(target=self._read_stdout, daemon=True)
        self._pump.start()

    def _read_stdout(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def __enter__(self) -> _Worker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.close()  # ends the child's request loop
        except OSError:
            pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._pump.join(timeout=5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()

    def _stderr_text(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        return self._stderr.read()

    def ask(self, request: dict, timeout_s: float, doing: str) -> dict:
        """Send one request and return its reply; every way the child can fail is a VideoError."""
        shown = self.shown
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        except OSError:
            pass  # the child is gone; its exit status below says how
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._proc.kill()  # our own child, by its handle
                self._proc.wait()
                raise VideoError(
                    f"decord did not finish {doing} {shown} within {timeout_s:.0f} s (it can hang "
                    f"on damaged files) — check the file plays, or {_reencode_hint(shown)}"
                ) from None
            if line is None:
                break
            try:
                reply = json.loads(line)
            except json.JSONDecodeError:
                continue  # stray output from a native library, not an answer
            if isinstance(reply, dict) and "ok" in reply:
                reply["stderr"] = "" if reply["ok"] else self._stderr_text()
                if reply.get("stage") == "import":
                    raise VideoError(
                        f"decord is not usable ({_detail(reply)}) — reinstall it with "
                        f"pip install decord"
                    )
                return reply

        # The child closed its output without answering: it crashed or exited.
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            raise VideoError(
                f"decord crashed ({name}) while {doing} {shown} — check the file plays, or "
                f"{_reencode_hint(shown)}"
            )
        lines = [line for line in self._stderr_text().splitlines() if line.strip()]
        detail = (_one_line(lines[-1]) if lines else "") or f"exit status {code}, no answer"
        raise VideoError(
            f"decord failed while {doing} {shown} ({detail}) — check the file plays, or "
            f"{_reencode_hint(shown)}"
        )


def _open_failure(shown: str, reply: dict) -> VideoError:
    if "cannot find video stream" in reply.get("error", ""):
        return VideoError(
            f"{shown} has no video stream (audio only?) — pass a file with a video track"
        )
    return VideoError(
        f"{shown} is not a readable video (decord: {_detail(reply)}) — check the file plays, or "
        f"{_reencode_hint(shown)}"
    )


def _probe(worker: _Worker, file: Path, shown: str) -> VideoInfo:
    sha256 = _sha256_file(file, shown)
    reply = worker.ask({"op": "probe", "path": str(file)}, PROBE_TIMEOUT_S, "probing")
    if not reply["ok"]:
        if reply["stage"] == "open":
            raise _open_failure(shown, reply)
        raise VideoError(
            f"{shown} cannot be decoded (decord: {_detail(reply)}) — check the file plays, or "
            f"{_reencode_hint(shown)}"
        )
    if reply["num_frames"] < 1:
        raise VideoError(
            f"{shown} has no decodable video frames — check the file plays, or "
            f"{_reencode_hint(shown)}"
        )
    fps = float(reply["fps"])
    if not (math.isfinite(fps) and fps > 0):
        raise VideoError(
            f"{shown} reports no usable frame rate ({fps}) — re-encode it with a fixed rate: "
            f"ffmpeg -i {shlex.quote(shown)} -r 25 -c:v libx264 fixed.mp4"
        )
    return VideoInfo(
        path=str(file.resolve()),
        sha256=sha256,
        num_frames=int(reply["num_frames"]),
        fps=fps,
        width=int(reply["width"]),
        height=int(reply["height"]),
    )


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Check that path is a decodable video and return its facts, including the sha256 of its
    bytes (the cache key's video part)."""
    shown = os.fspath(path)
    file = Path(shown)
    _check_file(file, shown)  # cheap checks first: no child for a missing path
    with _Worker(shown) as worker:
        return _probe(worker, file, shown)


def decode_size(width: int, height: int, settings: FrameSettings) -> tuple[int, int]:
    """(height, width) to decode a width x height source at: settings' size when stretching;
    for crop the smallest size that covers it, for pad the largest that fits in it, either with
    the source's aspect ratio."""
    if settings.fit == "stretch":
        return settings.height, settings.width
    pick = max if settings.fit == "crop" else min
    scale = pick(settings.height / height, settings.width / width)
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    if settings.fit == "crop":  # rounding must not leave the frame a pixel short
        return max(h, settings.height), max(w, settings.width)
    return min(h, settings.height), min(w, settings.width)


def fit_frames(frames: np.ndarray, settings: FrameSettings) -> np.ndarray:
    """uint8 [F, h, w, 3] at decode_size -> [F, height, width, 3]: the centre cut out (crop) or
    placed on black (pad); stretched frames are already the right size."""
    _, h, w, _ = frames.shape
    top, left = abs(h - settings.height) // 2, abs(w - settings.width) // 2
    if settings.fit == "crop":
        return np.ascontiguousarray(frames[:, top : top + settings.height, left : left + settings.width])
    if settings.fit == "pad":
        out = np.zeros((frames.shape[0], settings.height, settings.width, 3), dtype=frames.dtype)
        out[:, top : top + h, left : left + w] = frames
        return out
    return frames


def _warn_if_squashed(shown: str, info: VideoInfo, settings: FrameSettings) -> None:
    source, target = info.width / info.height, settings.width / settings.height
    if settings.fit == "stretch" and max(source / target, target / source) > 1 + ASPECT_TOLERANCE:
        log.warning(
            "%s is %dx%d and is stretched to %dx%d, changing its aspect ratio from %.2f to %.2f; "
            "pass --fit crop or --fit pad to keep its shape",
            Path(shown).name, info.width, info.height, settings.width, settings.height, source, target,
        )


def read_frames(path: str | os.PathLike, settings: FrameSettings) -> tuple[torch.Tensor, VideoInfo]:
    """Decode the selected frames at settings' size, fitted as settings.fit says: uint8
    [F, H, W, 3] and the source's facts. Only the selected frames are decoded, a chunk at a time,
    already scaled by decord."""
    shown = os.fspath(path)
    file = Path(shown)
    _check_file(file, shown)
    with _Worker(shown) as worker, tempfile.TemporaryDirectory(prefix="cogedit-frames-") as tmp:
        info = _probe(worker, file, shown)
        try:
            indices = select_frame_indices(info.num_frames, settings, info.fps)
        except VideoError as exc:
            raise VideoError(f"{shown}: {exc}") from None

        _warn_if_squashed(shown, info, settings)
        height, width = decode_size(info.width, info.height, settings)
        out = os.path.join(tmp, "frames.npy")
        request = {
            "op": "decode",
            "path": info.path,
            "indices": indices,
            "height": height,
            "width": width,
            "chunk": DECODE_CHUNK,
            "out": out,
        }
        timeout = DECODE_TIMEOUT_S + DECODE_TIMEOUT_PER_FRAME_S * len(indices)
        reply = worker.ask(request, timeout, "decoding")
        if not reply["ok"]:
            if reply["stage"] == "open":
                raise _open_failure(shown, reply)
            where = f" at {reply['where']}" if reply.get("where") else ""
            raise VideoError(
                f"{shown} could not be decoded{where} (decord: {_detail(reply)}; the file may be "
                f"truncated or damaged) — {_reencode_hint(shown)}"
            )
        frames = np.load(out)  # reads into memory, so the temporary folder can go

    expected = (len(indices), height, width, 3)
    if frames.shape != expected or frames.dtype != np.uint8:
        raise VideoError(
            f"{shown} decoded to {frames.dtype} {frames.shape}, expected uint8 {expected} — "
            f"{_reencode_hint(shown)}"
        )
    return torch.from_numpy(fit_frames(frames, settings)), info


def to_model_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [F, 3, H, W] in [-1, 1], the VAE's input convention."""
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 tensor, got {getattr(frames, 'dtype', type(frames))}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames shaped [F, H, W, 3], got {list(frames.shape)}")
    return (frames.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0).contiguous()
