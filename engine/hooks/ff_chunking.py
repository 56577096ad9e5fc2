"""Feed-forward chunking: run each block's MLP over the tokens in slices.

The MLP's 4x-wide intermediate (and its GELU copy) is the largest activation of a CogVideoX
block: about 0.9 GB per row at 17,776 tokens in bf16. The MLP acts on each token alone, so
slicing the tokens gives the same result with a fraction of that peak. diffusers chunks
feed-forwards only for blocks that expose `set_chunk_feed_forward`, which CogVideoXBlock does
not, so this is a small hook in diffusers' hook registry.

The hook sits on the block and swaps its `ff` for a `ChunkedFeedForward` around it while
registered: a hook on `ff` itself would give each block's `ff.forward` its own object, which
dynamo guards on, so every compiled block would be a new graph (issue 17); the wrapper's
forward is its class's, the same for every block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.hooks import registry as hooks
from engine.hooks.registry import ModelHook

FF_CHUNKING = "cogedit_ff_chunking"


@dataclass(frozen=True)
class FFChunkingConfig:
    """Tokens per MLP call."""

    chunk_tokens: int


class ChunkedFeedForward(torch.nn.Module):
    """A block's MLP over at most `chunk` tokens at a time."""

    def __init__(self, ff: torch.nn.Module, chunk: int) -> None:
        super().__init__()
        self.inner, self.chunk = ff, chunk

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if hidden_states.shape[1] <= self.chunk:
            return self.inner(hidden_states, *args, **kwargs)
        out = None  # filled slice by slice: a list of slices to join would double the output
        for start in range(0, hidden_states.shape[1], self.chunk):
            part = self.inner(hidden_states[:, start : start + self.chunk], *args, **kwargs)
            if out is None:
                out = part.new_empty(*hidden_states.shape[:2], part.shape[-1])
            out[:, start : start + self.chunk] = part
        return out


class ChunkedFeedForwardHook(ModelHook):
    """On a block: its `ff` runs chunked while the hook is registered."""

    def __init__(self, config: FFChunkingConfig) -> None:
        super().__init__()
        self.chunk = config.chunk_tokens

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        module.ff = ChunkedFeedForward(module.ff, self.chunk)
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # diffusers' spelling
        module.ff = module.ff.inner
        return module


def apply_ff_chunking(transformer: torch.nn.Module, config: FFChunkingConfig) -> None:
    """Make every block's `ff` process at most `config.chunk_tokens` tokens at a time."""
    for block in transformer.transformer_blocks:
        hooks.register(block, ChunkedFeedForwardHook(config), FF_CHUNKING)


def remove_ff_chunking(transformer: torch.nn.Module) -> None:
    hooks.remove(transformer, FF_CHUNKING)
