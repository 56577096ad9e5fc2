"""Row groups: run each transformer block over a few rows of the batch at a time.

A CogVideoX block treats every row (latent + prompt) on its own except where reference
injection joins them, so a block can run over the rows in groups with the same result and a
fraction of the activation memory. Grouping per block, not per transformer call, keeps the
shared reference row live: in every block the reference group runs first and leaves its K/V
(one block's worth, ~0.2 GB at 49x480x720) for the edit groups that follow, so no stored
attention is needed. diffusers has no row-wise execution for a block, so this is a hook in
diffusers' hook registry.

Each group's block adds its residuals into its own input rows (`_block_in_place`): diffusers'
block returns new tensors for every residual sum, and with its other temporaries those were the
lean plan's peak on the H100 (benchmarks/results/peak_lean.json).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.hooks import registry as hooks
from engine.hooks.injection import InjectionState
from engine.hooks.registry import ModelHook


def row_groups(n: int, size: int, state: InjectionState | None) -> list[range]:
    """The groups a block runs, in order: the reference rows first (when in the batch), then edit rows."""
    has_reference = state is not None and state.active and state.stored is None and n > state.n_edit
    edit = state.n_edit if has_reference else n
    groups = [range(g, min(g + size, edit)) for g in range(0, edit, size)]
    return [range(edit, n), *groups] if has_reference else groups


def _modulated(norm_zero, hidden: torch.Tensor, encoder: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """diffusers' CogVideoXLayerNormZero over text and image tokens joined (text first), the
    modulation applied in place: (joined input, image gate, text gate)."""
    shift, scale, gate, text_shift, text_scale, text_gate = norm_zero.linear(norm_zero.silu(temb)).chunk(6, dim=1)
    text_len = encoder.shape[1]
    x = norm_zero.norm(torch.cat([encoder, hidden], dim=1))
    x[:, :text_len].mul_((1 + text_scale)[:, None]).add_(text_shift[:, None])
    x[:, text_len:].mul_((1 + scale)[:, None]).add_(shift[:, None])
    return x, gate[:, None], text_gate[:, None]


def _add_gated(hidden: torch.Tensor, encoder: torch.Tensor, out: torch.Tensor, gate: torch.Tensor, text_gate: torch.Tensor) -> None:
    """hidden += gate * image part of `out`, encoder += text_gate * text part, scaling `out` in
    place: the same two bf16 roundings as diffusers' `hidden + gate * out`, with no new tensor."""
    text_len = encoder.shape[1]
    hidden.add_(out[:, text_len:].mul_(gate))
    encoder.add_(out[:, :text_len].mul_(text_gate))


def _block_in_place(block: torch.nn.Module, hidden: torch.Tensor, encoder: torch.Tensor, temb: torch.Tensor, rotary) -> None:
    """diffusers' CogVideoXBlock.forward over one group's rows, written into `hidden` and `encoder`.

    Each input is handed on in a one-item list that the callee empties, so that it is freed as
    soon as it has been used rather than when this frame returns.
    """
    x, gate, text_gate = _modulated(block.norm1, hidden, encoder, temb)
    held = [x]
    del x
    _add_gated(hidden, encoder, block.attn1.processor.joined(block.attn1, held, encoder.shape[1], rotary), gate, text_gate)
    x, gate, text_gate = _modulated(block.norm2, hidden, encoder, temb)
    _add_gated(hidden, encoder, block.ff(x), gate, text_gate)


ROW_GROUPS = "cogedit_row_groups"


@dataclass(frozen=True)
class RowGroupConfig:
    """Rows per block call, and the edit's injection state (None outside an edit)."""

    size: int
    state: InjectionState | None = None


class RowGroupsHook(ModelHook):
    """On a CogVideoX block: run it over `config.size` rows at a time, in place (`state.rows`
    says which). The blocks' attention must be cogedit's (engine.hooks.injection), as the engine sets
    it: the in-place block hands it the joined input. The groups run eagerly, not through the
    compiled block (engine.models.components.compile_blocks): compiled, the in-place writes into
    the block's input would be functionalized into copies, the memory this plan exists to save."""

    def __init__(self, config: RowGroupConfig) -> None:
        super().__init__()
        self.config = config

    def new_forward(self, module, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, attention_kwargs=None):
        state = self.config.state
        try:
            for rows in row_groups(hidden_states.shape[0], self.config.size, state):
                if state is not None:
                    state.rows = rows
                # Written over the block's input rows: each group reads only its own rows, and
                # a separate output would hold a second batch-sized tensor.
                sl = slice(rows.start, rows.stop)
                _block_in_place(module, hidden_states[sl], encoder_hidden_states[sl], temb[sl], image_rotary_emb)
        finally:
            if state is not None:
                state.rows = None
                state.held = None
        return hidden_states, encoder_hidden_states


class RowsInPlaceHook(ModelHook):
    """On the final norms: a group of rows at a time over their own input. Measured on the H100,
    their three batch-sized outputs were the lean plan's peak, above any block's."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def new_forward(self, module, hidden_states, *args, **kwargs):
        forward = self.fn_ref.original_forward
        n = hidden_states.shape[0]
        rows = lambda a, sl: a[sl] if torch.is_tensor(a) and a.shape[:1] == (n,) else a  # noqa: E731
        for g in range(0, n, self.size):
            sl = slice(g, g + self.size)
            hidden_states[sl] = forward(hidden_states[sl], *(rows(a, sl) for a in args), **{k: rows(a, sl) for k, a in kwargs.items()})
        return hidden_states


def apply_row_groups(transformer: torch.nn.Module, config: RowGroupConfig) -> None:
    """Every block (and the final norms) runs at most `config.size` rows per call; same result."""
    for block in transformer.transformer_blocks:
        hooks.register(block, RowGroupsHook(config), ROW_GROUPS)
    for norm in (transformer.norm_final, transformer.norm_out):
        hooks.register(norm, RowsInPlaceHook(config.size), ROW_GROUPS)


def remove_row_groups(transformer: torch.nn.Module) -> None:
    hooks.remove(transformer, ROW_GROUPS)
