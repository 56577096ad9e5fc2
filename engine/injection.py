"""Reference K/V injection into CogVideoX self-attention, as an attention processor.

In each chosen block, edit rows attend to their own keys/values concatenated with those of a
reference row (the inversion trajectory at the same noise level), which carries the source's
structure and motion into the edit. The batch is laid out [edit rows..., reference rows...];
`InjectionState.ref_of[j]` says which reference row edit row j reads. A log-bias on the
reference logits sets the strength (0 = no injection, 1 = plain concatenation as upstream).

diffusers' CogVideoX processor computes q/k/v inside one call with no way to extend the key
set, so the projection, q/k norms and RoPE are spelled out here once more.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class InjectionState:
    """Per-step layout, set by the edit loop before each transformer call."""

    active: bool = False
    n_edit: int = 0
    ref_of: list[int] = field(default_factory=list)
    strength: float = 1.0
    # Replayed reference K/V by block (stored attention); None = reference rows are in the batch.
    stored: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    # Row groups (engine.row_groups): the batch rows this call carries (None = all), and the
    # reference K/V the reference group left for the edit groups of the same block.
    rows: range | None = None
    held: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


ROPE_HEADS = 8  # heads per RoPE slice: RoPE computes in float32, so slicing bounds that copy
INJECT_HEADS = 8  # heads per injected attention call (48 in CogVideoX-5B)


def _rope_(x: torch.Tensor, text_len: int, rotary) -> None:
    """RoPE on the image tokens of x [B, heads, tokens, dim], in place, a few heads at a time."""
    from diffusers.models.embeddings import apply_rotary_emb

    for h in range(0, x.shape[1], ROPE_HEADS):
        part = x[:, h : h + ROPE_HEADS, text_len:]
        part.copy_(apply_rotary_emb(part, rotary))


def _project(attn, hidden: torch.Tensor, text_len: int, rotary, heads: slice | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as [B, heads, tokens, head_dim], after the q/k norms and RoPE on image tokens.

    With `heads`, only those heads: the rows of each projection's weight that make them.
    """
    b, head_dim = hidden.shape[0], attn.to_q.out_features // attn.heads
    if heads is None:
        projected = (proj(hidden) for proj in (attn.to_q, attn.to_k, attn.to_v))
    else:
        rows = slice(heads.start * head_dim, heads.stop * head_dim)
        projected = (F.linear(hidden, p.weight[rows], None if p.bias is None else p.bias[rows]) for p in (attn.to_q, attn.to_k, attn.to_v))
    q, k, v = (x.view(b, -1, x.shape[-1] // head_dim, head_dim).transpose(1, 2) for x in projected)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if rotary is not None:
        _rope_(q, text_len, rotary)
        _rope_(k, text_len, rotary)
    return q, k, v


def _attend(qkv: list[torch.Tensor]) -> torch.Tensor:
    """Self-attention as [B, tokens, heads, head_dim]. Empties `qkv`, so that q, k and v are
    freed before the heads are copied back together."""
    out = F.scaled_dot_product_attention(*qkv)
    qkv.clear()
    return out.transpose(1, 2)


def _inject(out: torch.Tensor, heads: slice, q, k, v, ref_k, ref_v, index: torch.Tensor, mask) -> None:
    """Attention of q over its own keys joined with its reference's, for `heads`, written into
    `out` [B, tokens, heads, head_dim]. The joined keys and values are the largest tensors of an
    injected block, hence a few heads at a time."""
    keys = torch.cat([k, ref_k[index, heads]], dim=2)
    values = torch.cat([v, ref_v[index, heads]], dim=2)
    out[:, :, heads] = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask).transpose(1, 2)


def _output(attn, out: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The output projection of [B, tokens, heads, head_dim], split into image and text tokens."""
    out = attn.to_out[1](attn.to_out[0](out.flatten(2)))
    return out[:, text_len:], out[:, :text_len]


class CogVideoXAttnProcessor:
    """CogVideoX self-attention, the same arithmetic as diffusers' processor with a lower peak.

    diffusers applies RoPE to all 48 heads at once in float32, a transient about as large as
    a block's MLP activations at 17,776 tokens; here it runs in place, a few heads at a time.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        text_len = encoder_hidden_states.shape[1]
        # No name for the joined input or for q/k/v: each is freed as soon as it is used.
        return _output(attn, _attend(list(_project(attn, torch.cat([encoder_hidden_states, hidden_states], dim=1), text_len, image_rotary_emb))), text_len)


class KVInjectionProcessor:
    """Attention processor for `attn1` of a CogVideoX block that injects reference K/V."""

    def __init__(self, state: InjectionState, fallback, layer: int) -> None:
        self.state = state
        self.fallback = fallback  # the block's own processor, used outside the window
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        st = self.state
        if not st.active:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if st.rows is not None and st.stored is None and st.rows.start < st.n_edit:
            return self._edit_group(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        text_len = encoder_hidden_states.shape[1]
        q, k, v = _project(attn, torch.cat([encoder_hidden_states, hidden_states], dim=1), text_len, image_rotary_emb)
        rows = q.shape[0]
        if st.stored is not None:  # replayed K/V: every row in the call is an edit row
            n, (ref_k, ref_v) = rows, st.stored[self.layer]
            index = torch.zeros(n, dtype=torch.long, device=k.device)
        elif st.rows is None:  # the batch is [edit rows..., reference rows...]
            n, ref_k, ref_v = st.n_edit, k[st.n_edit :], v[st.n_edit :]
            index = torch.tensor(st.ref_of, device=k.device)
        else:  # a row group's reference rows: they attend to themselves and keep their K/V
            st.held[self.layer] = (k, v)
            qkv = [q, k, v]
            del q  # so that _attend frees it before the output copy
            return _output(attn, _attend(qkv), text_len)
        mask = _strength_mask(st.strength, k.shape[2], q.dtype, q.device)
        # Each slice's output goes straight to its place in `out`, with no list of parts to join.
        out = q.new_empty(rows, q.shape[2], q.shape[1], q.shape[3])
        for h in range(0, q.shape[1], INJECT_HEADS):
            heads = slice(h, h + INJECT_HEADS)
            _inject(out[:n], heads, q[:n, heads], k[:n, heads], v[:n, heads], ref_k, ref_v, index, mask)
        if n < rows:  # the reference rows in the batch attend to themselves only
            out[n:] = F.scaled_dot_product_attention(q[n:], ref_k, ref_v).transpose(1, 2)
        del q, k, v, ref_k, ref_v
        return _output(attn, out, text_len)

    def _edit_group(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """Edit rows of a row group against the held reference K/V, projecting a few heads at a
        time: rows run apart to save memory, and their full q/k/v would be the peak."""
        st = self.state
        text_len = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        ref_k, ref_v = st.held[self.layer]
        index = torch.tensor([st.ref_of[j] for j in st.rows], device=x.device)
        mask = _strength_mask(st.strength, x.shape[1], x.dtype, x.device)
        out = x.new_empty(x.shape[0], x.shape[1], attn.heads, attn.to_q.out_features // attn.heads)
        for h in range(0, attn.heads, INJECT_HEADS):
            heads = slice(h, h + INJECT_HEADS)
            _inject(out, heads, *_project(attn, x, text_len, image_rotary_emb, heads), ref_k, ref_v, index, mask)
        del x
        return _output(attn, out, text_len)


def _strength_mask(strength: float, own: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """A log-bias on the reference half of the joined keys; None at strength 1 (plain concatenation)."""
    if strength == 1.0:
        return None
    mask = torch.zeros(1, 1, 1, 2 * own, dtype=dtype, device=device)
    mask[..., own:] = math.log(strength)
    return mask


@contextlib.contextmanager
def kv_injection(transformer: torch.nn.Module, layers: tuple[int, ...] | None, state: InjectionState) -> Iterator[None]:
    """Install the injection processor on the chosen blocks; restore the originals on exit."""
    blocks = transformer.transformer_blocks
    chosen = range(len(blocks)) if layers is None else layers
    originals = {i: blocks[i].attn1.processor for i in chosen}
    try:
        for i, proc in originals.items():
            blocks[i].attn1.set_processor(KVInjectionProcessor(state, proc, i))
        yield
    finally:
        for i, proc in originals.items():
            blocks[i].attn1.set_processor(proc)
