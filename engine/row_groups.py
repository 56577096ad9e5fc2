"""Row groups: run each transformer block over a few rows of the batch at a time.

A CogVideoX block treats every row (latent + prompt) on its own except where reference
injection joins them, so a block can run over the rows in groups with the same result and a
fraction of the activation memory. Grouping per block, not per transformer call, keeps the
shared reference row live: in every block the reference group runs first and leaves its K/V
(one block's worth, ~0.2 GB at 49x480x720) for the edit groups that follow, so no stored
attention is needed. diffusers has no row-wise execution for a block, so this is a hook in
diffusers' hook registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from engine.injection import InjectionState

HOOK_NAME = "cogedit_row_groups"


def row_groups(n: int, size: int, state: InjectionState | None) -> list[range]:
    """The groups a block runs, in order: the reference rows first (when in the batch), then edit rows."""
    has_reference = state is not None and state.active and state.stored is None and n > state.n_edit
    edit = state.n_edit if has_reference else n
    groups = [range(g, min(g + size, edit)) for g in range(0, edit, size)]
    return [range(edit, n), *groups] if has_reference else groups


@contextlib.contextmanager
def rows_apart(transformer: torch.nn.Module, size: int, state: InjectionState | None = None) -> Iterator[None]:
    """Within the context, every block runs at most `size` rows per call (`state.rows` says which)."""
    from diffusers.hooks import HookRegistry, ModelHook

    class RowGroups(ModelHook):
        def new_forward(self, module, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
            forward = self.fn_ref.original_forward
            groups = row_groups(hidden_states.shape[0], size, state)
            if len(groups) == 1:
                return forward(hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs)
            try:
                for rows in groups:
                    if state is not None:
                        state.rows = rows
                    sl = slice(rows.start, rows.stop)
                    h, e = forward(hidden_states[sl], encoder_hidden_states[sl], temb[sl], image_rotary_emb, attention_kwargs)
                    # Written over the block's input rows: each group reads only its own rows, and
                    # a separate output would hold a second batch-sized tensor.
                    hidden_states[sl] = h
                    encoder_hidden_states[sl] = e
                    del h, e
            finally:
                if state is not None:
                    state.rows = None
                    state.held.clear()
            return hidden_states, encoder_hidden_states

    blocks = transformer.transformer_blocks
    for block in blocks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(RowGroups(), HOOK_NAME)
    try:
        yield
    finally:
        for block in blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(HOOK_NAME, recurse=False)
