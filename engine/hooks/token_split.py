"""Sequence parallelism for CogVideoX blocks: the tokens of one transformer call split over a group
of processes (DeepSpeed-Ulysses, Jacobs et al. 2023).

Every process of the group holds a contiguous slice of the joined [text, image] token sequence
through all the blocks: norms, MLPs and projections work token by token. Attention is where tokens
meet, and there each process trades (all-to-all) its tokens' q, k and v for all heads against
every token's q, k and v for its share of the heads, runs cogedit's attention code unchanged over
those heads (injection's joined keys and strength bias, the LSE merge, row groups), and trades the
outputs back. The last block gathers the tokens, so everything after the blocks sees whole rows.

Why our own all-to-all rather than ParaAttention's or xDiT's (benchmarks/results/MULTIGPU.md has
the trials): both split tokens evenly only (CogVideoX's 226 text tokens allow at most 2 ways in
ParaAttention's CogVideoX adapter), ParaAttention's SDPA interception sizes the strength bias for
the local keys (a shape error at strength != 1) and never sees the FA4 custom op that the LSE
merge calls, xDiT replaces the attention processor and does not import without a GPU, and
para-attn 0.3.38 does not install from PyPI. torch.distributed.all_to_all_single with per-process
sizes is the whole exchange.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from engine.hooks import registry as hooks
from engine.hooks.injection import shared_processor
from engine.hooks.registry import ModelHook
from engine.hooks.token_exchange import TokenSplit

TOKEN_SPLIT = "cogedit_token_split"


class TokenSplitHook(ModelHook):
    """On every block: the rotary tables of this process's image tokens; on the first block the
    split of the joined tokens, on the last their gathering."""

    def __init__(self, split: TokenSplit, first: bool, last: bool) -> None:
        super().__init__()
        self.split, self.first, self.last = split, first, last

    def new_forward(self, module, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        sp = self.split
        if self.first:
            sp.share(encoder_hidden_states.shape[1] + hidden_states.shape[1], encoder_hidden_states.shape[1])
            mine = torch.cat([encoder_hidden_states, hidden_states], dim=1)[:, sp.start : sp.stop]
            own_text = max(0, min(sp.text, sp.stop) - sp.start)
            encoder_hidden_states, hidden_states = mine[:, :own_text], mine[:, own_text:]
        if image_rotary_emb is not None:  # rows of the image tokens this process holds
            rows = slice(max(sp.start, sp.text) - sp.text, sp.stop - sp.text)
            image_rotary_emb = tuple(t[rows] for t in image_rotary_emb)
        hidden_states, encoder_hidden_states = self.fn_ref.original_forward(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb, image_rotary_emb=image_rotary_emb, attention_kwargs=attention_kwargs
        )
        if self.last:
            whole = sp.gather(torch.cat([encoder_hidden_states, hidden_states], dim=1))
            hidden_states, encoder_hidden_states = whole[:, sp.text :], whole[:, : sp.text]
        return hidden_states, encoder_hidden_states


@contextlib.contextmanager
def tokens_split(transformer: torch.nn.Module, split: TokenSplit | None) -> Iterator[None]:
    """The transformer's calls split over `split`'s group for the `with` block (nothing when None
    or idle). Enter it after the other block hooks: it must run outermost, before row groups."""
    if split is None or not split.on:
        yield
        return
    processor = shared_processor(transformer)
    blocks = transformer.transformer_blocks
    for i, block in enumerate(blocks):
        hooks.register(block, TokenSplitHook(split, i == 0, i == len(blocks) - 1), TOKEN_SPLIT)
    processor.split = split
    try:
        yield
    finally:
        hooks.remove(transformer, TOKEN_SPLIT)
        processor.split = TokenSplit()
