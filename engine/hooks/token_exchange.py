"""One process's share of a token-split group and the all-to-all that trades tokens for heads
(engine.hooks.token_split splits the blocks' calls; the attention processor exchanges through this).
Its own module: the processor needs the exchange, and token_split needs the processor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class TokenSplit:
    """One process's place in a token-split group; `size` 1 (no group) is the idle split, as the
    shared processor holds when no tokens are split. `counts` and `text` describe the current call."""

    group: Any = None  # torch.distributed ProcessGroup
    rank: int = 0  # in the group
    size: int = 1
    counts: tuple[int, ...] = ()  # tokens each process holds, in rank order
    text: int = 0  # text tokens of the whole sequence

    @property
    def on(self) -> bool:
        return self.size > 1

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def start(self) -> int:
        return sum(self.counts[: self.rank])

    @property
    def stop(self) -> int:
        return self.start + self.counts[self.rank]

    def share(self, tokens: int, text: int) -> None:
        """Split `tokens` (the first `text` of them text) as evenly as they go."""
        base, extra = divmod(tokens, self.size)
        self.counts, self.text = tuple(base + (r < extra) for r in range(self.size)), text

    def to_heads(self, y: torch.Tensor) -> torch.Tensor:
        """[B, size * h, own tokens, D], head block j for process j -> [B, h, all tokens, D]."""
        b, heads, n, d = y.shape
        h = heads // self.size
        send = y.view(b, self.size, h, n, d).transpose(0, 1).contiguous()
        got = y.new_empty(b * h * self.total * d)
        dist.all_to_all_single(got, send.view(-1), [b * h * c * d for c in self.counts], [b * h * n * d] * self.size, group=self.group)
        parts = got.split([b * h * c * d for c in self.counts])
        return torch.cat([p.view(b, h, c, d) for p, c in zip(parts, self.counts)], dim=2)

    def to_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """[B, all tokens, h, D] -> [B, own tokens, size * h, D] (process j's heads j-th)."""
        b, _, h, d = out.shape
        n = self.counts[self.rank]
        send = out.transpose(0, 1).contiguous()  # by token: each process's slice is one block
        got = out.new_empty(self.size * n * b * h * d)
        dist.all_to_all_single(got, send.view(-1), [n * b * h * d] * self.size, [c * b * h * d for c in self.counts], group=self.group)
        return got.view(self.size, n, b, h, d).permute(2, 1, 0, 3, 4).reshape(b, n, self.size * h, d)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, own tokens, C] from every process -> [B, all tokens, C] (all_gather takes equal
        sizes: the shorter slices travel padded)."""
        most = max(self.counts)
        padded = torch.nn.functional.pad(x, (0, 0, 0, most - x.shape[1])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:, :c] for p, c in zip(parts, self.counts)], dim=1)
