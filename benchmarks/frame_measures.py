"""How an edited video is judged on the proxy: structure kept from the source, and which clip it
looks like. Frames are uint8 [N, H, W, 3] tensors, as `engine.edit(..., output="frames")` returns.

Structure: SSIM (Wang et al. 2004) on luma, which compares local means, contrasts and
correlations, so it rewards the source's layout and edges surviving an edit, where PSNR mostly
counts colour changes the prompt asked for. Adherence: a softmax regression on downsampled frames
of the proxy's three training clips; an edit towards clip c's caption adheres when its frames look
like clip c. Both can fail: an unedited source scores low on another clip (tests/test_quality.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
FEATURE_POOL = 8  # 96x144 frames -> 12x18x3 features: layout and colour, not texture


def luma(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 1, H, W] in 0-255."""
    return (frames.float() * torch.tensor(LUMA)).sum(-1).unsqueeze(1)


def ssim(a: torch.Tensor, b: torch.Tensor, size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two uint8 videos on luma, Gaussian window 11 / 1.5 as in the paper."""
    x, y = luma(a), luma(b)
    g = torch.exp(-((torch.arange(size) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()

    def blur(z: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid region only
        return F.conv2d(F.conv2d(z, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean().item()


def features(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> [N, D]: area-downsampled RGB in 0-1."""
    x = frames.permute(0, 3, 1, 2).float() / 255
    return F.avg_pool2d(x, FEATURE_POOL).flatten(1)


@dataclass(frozen=True)
class ClipClassifier:
    """Softmax regression from frame features to clip names, on standardized features."""

    names: tuple[str, ...]
    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def probabilities(self, frames: torch.Tensor) -> torch.Tensor:
        """[N, len(names)]: each frame's probability of coming from each clip."""
        z = (features(frames) - self.mean) / self.std
        return torch.softmax(z @ self.weight + self.bias, dim=-1)

    def adherence(self, frames: torch.Tensor, name: str) -> dict[str, float]:
        """Mean probability of clip `name` over the frames, and the share of frames it wins."""
        p = self.probabilities(frames)
        k = self.names.index(name)
        return {"p_target": p[:, k].mean().item(), "frac_target": (p.argmax(-1) == k).float().mean().item()}


def fit_classifier(clips: dict[str, torch.Tensor], weight_decay: float = 1e-2, iters: int = 200) -> ClipClassifier:
    """Fit on every frame of each clip and its mirror image (the proxy learned mirrored copies too,
    so its samples may come out mirrored). L-BFGS on the L2-regularized cross-entropy: deterministic."""
    names = tuple(clips)
    frames = [torch.cat([f, f.flip(2)]) for f in clips.values()]
    x = torch.cat([features(f) for f in frames])
    labels = torch.cat([torch.full((len(f),), k) for k, f in enumerate(frames)])
    mean, std = x.mean(0), x.std(0) + 1e-3
    z = (x - mean) / std
    weight = torch.zeros(z.shape[1], len(names), requires_grad=True)
    bias = torch.zeros(len(names), requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=iters, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = F.cross_entropy(z @ weight + bias, labels) + weight_decay * weight.pow(2).sum()
        value.backward()
        return value

    opt.step(loss)
    return ClipClassifier(names, mean, std, weight.detach(), bias.detach())
