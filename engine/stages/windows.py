"""Clips longer than the model's window: overlapping windows over one latent sequence, blended
along time at every step (MultiDiffusion, Bar-Tal et al. 2023, applied to the frame axis).

The transformer was trained on a fixed number of latent frames (13 for CogVideoX-5B). A longer
clip's latent sequence is cut into windows of that length, the last one aligned to the end, and
each denoising (or inversion) step predicts v for every window with its own rotary tables (each
window is an ordinary model call) and averages the overlapping frames' predictions, every window
that covers a frame alike (MultiDiffusion's own average; weights that fell off toward a window's
ends edited the later windows more weakly, benchmarks/results/LONG_CLIPS.md). The scheduler then
takes one step on the whole sequence, so every window sees the same latent at every noise level
and the joins carry no seam of their own. A window that starts mid-clip begins with an anchor,
the latent of one video frame encoded alone (`window_calls`). A clip of one window or less is one
call on the whole sequence, exactly as before.

Nothing in the ecosystem blends diffusion windows along time for an arbitrary model call, so the
spans, the weights and the blended prediction are written here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.errors import SettingsError

if TYPE_CHECKING:  # torch is imported where tensors are made: `cogedit plan` counts windows without it
    import torch

    from engine.models.model_info import ModelInfo


@dataclass(frozen=True)
class Windowing:
    """How a latent sequence is cut: `length` latent frames per call, `overlap` shared by neighbours."""

    length: int
    overlap: int

    def __post_init__(self) -> None:
        if self.length < 2:  # a later window's first frame is its anchor (`window_calls`)
            raise SettingsError(f"a window needs at least two latent frames, got {self.length}")
        if not 1 <= self.overlap < self.length:  # a later window leaves its first frame to the one before
            raise SettingsError(f"--window-overlap must be between 1 and {self.length - 1} latent frames (the window is {self.length}), got {self.overlap}")

    def spans(self, frames: int) -> list[tuple[int, int]]:
        """[start, stop) of each window over `frames` latent frames; see `window_spans`."""
        return window_spans(frames, self.length, self.overlap)

    def count(self, frames: int) -> int:
        return len(self.spans(frames))


def default_overlap(length: int) -> int:
    """About 30% of a window, and at least 3 frames where the window allows (13 -> 4, 5 -> 3,
    3 -> 2): a later window leaves its first frame to its anchor, so 3 keep two frames blended
    at every join (with 2, a short window's edit was weaker: benchmarks/results/LONG_CLIPS.md)."""
    return min(length - 1, max(3, (3 * length + 5) // 10))


def window_count(info: ModelInfo, frames: int) -> int:
    """Windows a clip of `frames` video frames takes on model `info` with the default overlap."""
    return Windowing(info.latent_window, default_overlap(info.latent_window)).count(info.vae_latent_frames(frames))


def window_spans(frames: int, length: int, overlap: int) -> list[tuple[int, int]]:
    """The fewest windows of `length` frames whose neighbours share at least `overlap`, spread
    evenly from the first frame to the last (the last window ends on the clip's last frame); one
    window when `frames <= length`."""
    if frames <= length:
        return [(0, frames)]
    count = -(-(frames - overlap) // (length - overlap))  # ceil: (count - 1) strides of <= length - overlap
    room, gaps = frames - length, count - 1
    starts = [(2 * k * room + gaps) // (2 * gaps) for k in range(count)]  # round(k * room / gaps), half up
    return [(s, s + length) for s in starts]


def window_calls(spans: list[tuple[int, int]]) -> list[list[int]]:
    """Each window's frames of the stepped state (the clip's latent frames, then one anchor per
    window that starts mid-clip): the first window is its span; a later window (s, e) is its
    anchor (state frame `frames + k`) in place of latent frame s, then s+1..e-1.

    Why the anchor: the model always saw a clip's first latent frame encode one video frame alone;
    a window that starts mid-clip would start on a latent frame of four, and the model edits such
    a window much more weakly (benchmarks/results/LONG_CLIPS.md). The anchor is the VAE's latent
    of video frame 4s alone, the frame just before latent s+1's four: the window then starts as
    every clip the model saw does. Latent frame s itself is left to the window before."""
    frames = spans[-1][1]
    return [list(range(*spans[0]))] + [[frames + k, *range(s + 1, e)] for k, (s, e) in enumerate(spans[1:])]


def state_frames(spans: list[tuple[int, int]]) -> int:
    """Frames of the stepped state: the clip's latent frames and the windows' anchors."""
    return spans[-1][1] + len(spans) - 1


def anchor_frames(spans: list[tuple[int, int]], temporal: int) -> list[int]:
    """The video frame each anchor encodes alone: the last of its window's first latent frame
    (latent frame s holds video frames temporal*(s-1)+1 .. temporal*s)."""
    return [temporal * s for s, _ in spans[1:]]


def blend_weights(spans: list[tuple[int, int]]) -> torch.Tensor:
    """[windows, state frames] float32: each window's share of each frame of the state, equal
    among the windows that cover the frame (the shares of each frame sum to 1; an anchor is its
    own window's alone)."""
    import torch

    raw = torch.zeros(len(spans), state_frames(spans), dtype=torch.float64)
    for w, frames in enumerate(window_calls(spans)):
        raw[w, frames] = 1.0
    total = raw.sum(0)
    if bool((total == 0).any()):
        raise ValueError(f"the windows {spans} leave latent frames uncovered")
    return (raw / total).float()


def frames_of(x: torch.Tensor, frames: slice | list[int]) -> torch.Tensor:
    """A window's frames (dim 1) of a state-shaped tensor; the tensor itself for a whole-clip slice."""
    return x if frames == slice(0, x.shape[1]) else x[:, frames].contiguous()


def blended(predict_window: Callable[[int, slice | list[int]], torch.Tensor], spans: list[tuple[int, int]]) -> torch.Tensor:
    """The whole state's prediction from one call per window: `predict_window(w, frames)` returns
    [B, n, ...] for window w's frames of the state (`window_calls`, dim 1); overlapping frames are
    averaged with `blend_weights`. One window covering everything is the call itself, bit for bit."""
    if len(spans) == 1:
        return predict_window(0, slice(*spans[0]))
    calls = window_calls(spans)
    weights = blend_weights(spans)
    out = None
    for w, frames in enumerate(calls):
        v = predict_window(w, frames)
        if out is None:
            out = v.new_zeros((v.shape[0], weights.shape[1], *v.shape[2:]))
        share = weights[w, frames].to(v.device, v.dtype).view(1, -1, *([1] * (v.dim() - 2)))
        out[:, frames] += share * v
    return out


def window_shape(shape: torch.Size, spans: list[tuple[int, int]]) -> torch.Size:
    """The latent shape one window's call sees (its rotary tables are built for it)."""
    import torch

    start, stop = spans[0]
    return torch.Size((shape[0], stop - start, *shape[2:]))
