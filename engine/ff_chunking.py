"""Feed-forward chunking: run each block's MLP over the tokens in slices.

The MLP's 4x-wide intermediate (and its GELU copy) is the largest activation of a CogVideoX
block: about 0.9 GB per row at 17,776 tokens in bf16. The MLP acts on each token alone, so
slicing the tokens gives the same result with a fraction of that peak. diffusers chunks
feed-forwards only for blocks that expose `set_chunk_feed_forward`, which CogVideoXBlock does
not, so this is a small hook in diffusers' hook registry.
"""

from __future__ import annotations

import torch

HOOK_NAME = "cogedit_ff_chunking"


def apply_ff_chunking(transformer: torch.nn.Module, chunk_tokens: int) -> None:
    """Make every block's `ff` process at most `chunk_tokens` tokens at a time."""
    from diffusers.hooks import HookRegistry, ModelHook

    class ChunkedFeedForward(ModelHook):
        def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            forward = self.fn_ref.original_forward
            if hidden_states.shape[1] <= chunk_tokens:
                return forward(hidden_states, *args, **kwargs)
            out = None  # filled slice by slice: a list of slices to join would double the output
            for start in range(0, hidden_states.shape[1], chunk_tokens):
                part = forward(hidden_states[:, start : start + chunk_tokens], *args, **kwargs)
                if out is None:
                    out = part.new_empty(*hidden_states.shape[:2], part.shape[-1])
                out[:, start : start + chunk_tokens] = part
            return out

    for block in transformer.transformer_blocks:
        HookRegistry.check_if_exists_or_initialize(block.ff).register_hook(ChunkedFeedForward(), HOOK_NAME)
