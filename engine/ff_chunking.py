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
            return torch.cat([forward(part, *args, **kwargs) for part in hidden_states.split(chunk_tokens, dim=1)], dim=1)

    for block in transformer.transformer_blocks:
        HookRegistry.check_if_exists_or_initialize(block.ff).register_hook(ChunkedFeedForward(), HOOK_NAME)
