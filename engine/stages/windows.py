"""Clips longer than the model's window: overlapping windows over one latent sequence, blended
along time at every step (MultiDiffusion, Bar-Tal et al. 2023, applied to the frame axis).

The transformer was trained on a fixed number of latent frames (13 for CogVideoX-5B). A longer
clip's latent sequence is cut into windows of that length, the last one aligned to the end, and
each denoising (or inversion) step predicts v for every window with its own rotary tables (each
window is an ordinary model call) and averages the overlapping frames' predictions with weights
that fall off toward a window's ends. The scheduler then takes one step on the whole sequence, so
every window sees the same latent at every noise level and the joins carry no seam of their own.
A clip of one window or less is one call on the whole sequence, exactly as before.

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
        if self.length < 1:
            raise SettingsError(f"a window needs at least one latent frame, got {self.length}")
        if not 0 <= self.overlap < self.length:
            raise SettingsError(f"--window-overlap must be between 0 and {self.length - 1} latent frames (the window is {self.length}), got {self.overlap}")

    def spans(self, frames: int) -> list[tuple[int, int]]:
        """[start, stop) of each window over `frames` latent frames; see `window_spans`."""
        return window_spans(frames, self.length, self.overlap)

    def count(self, frames: int) -> int:
        return len(self.spans(frames))


def default_overlap(length: int) -> int:
    """About 30% of a window, at least one frame (13 -> 4, 5 -> 2, 3 -> 1)."""
    return max(1, (3 * length + 5) // 10) if length > 1 else 0


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


def blend_weights(spans: list[tuple[int, int]], frames: int) -> torch.Tensor:
    """[windows, frames] float32: each window's share of each frame. Inside a window a frame j of
    n weighs min(j + 1, n - j) (a tent: largest in the middle, smallest at the ends, where the
    window's view of the motion is one-sided); the shares of each frame sum to 1."""
    import torch

    raw = torch.zeros(len(spans), frames, dtype=torch.float64)
    for w, (start, stop) in enumerate(spans):
        n = stop - start
        j = torch.arange(n, dtype=torch.float64)
        raw[w, start:stop] = torch.minimum(j + 1, n - j)
    total = raw.sum(0)
    if bool((total == 0).any()):
        raise ValueError(f"the windows {spans} leave latent frames of {frames} uncovered")
    return (raw / total).float()


def blended(predict_window: Callable[[slice], torch.Tensor], frames: int, spans: list[tuple[int, int]]) -> torch.Tensor:
    """The whole sequence's prediction from one call per window: `predict_window(slice)` returns
    [B, n, ...] for the frames of the slice (dim 1); overlapping frames are averaged with
    `blend_weights`. One window covering everything is the call itself, bit for bit."""
    if spans == [(0, frames)]:
        return predict_window(slice(0, frames))
    weights = blend_weights(spans, frames)
    out = None
    for w, (start, stop) in enumerate(spans):
        v = predict_window(slice(start, stop))
        if out is None:
            out = v.new_zeros((v.shape[0], frames, *v.shape[2:]))
        share = weights[w, start:stop].to(v.device, v.dtype).view(1, -1, *([1] * (v.dim() - 2)))
        out[:, start:stop] += share * v
    return out


def window_shape(shape: torch.Size, spans: list[tuple[int, int]]) -> torch.Size:
    """The latent shape one window's call sees (its rotary tables are built for it)."""
    import torch

    start, stop = spans[0]
    return torch.Size((shape[0], stop - start, *shape[2:]))
