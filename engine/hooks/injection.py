"""Reference K/V injection into CogVideoX self-attention, and the attention processor it runs in.

In each chosen block, edit rows attend to their own keys/values concatenated with those of a
reference row (the inversion trajectory at the same noise level), which carries the source's
structure and motion into the edit. The batch is laid out [edit rows..., reference rows...];
`InjectionState.ref_of[j]` says which reference row edit row j reads. A log-bias on the
reference logits sets the strength (0 = no injection, 1 = plain concatenation as upstream).

diffusers' CogVideoX processor computes q/k/v inside one call with no way to extend the key
set, so the projection, q/k norms and RoPE are spelled out here once more.

How it attaches, so that regional compilation survives it (engine.models.components.compile_blocks):
the blocks' attention is ONE processor object shared by every block, and everything per block
(whether this block injects, its stored K/V) is set by a named hook on the block itself, whose
dispatch runs outside the compiled block. A hook on `attn1` made each block's `attn1.forward`
its own object, which dynamo guards on: every block was a new graph (issue 17).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.hooks import registry as hooks
from engine.hooks.attention import attend, attend_lse, merge, merges
from engine.hooks.registry import ModelHook
from engine.hooks.token_exchange import TokenSplit


@dataclass
class InjectionState:
    """The one object the edit's model features share, documented field by field.

    Written by the edit loop (`engine.stages.editing.ddim_edit`) before each transformer call: `active`,
    `n_edit`, `ref_of`, `strength`, `stored`. Written by the injection hook of a block before and
    after it runs: `here`, `layer_kv`. Written by the row-group hook (`engine.hooks.row_groups`)
    around each group of a block: `rows`, and by a reference group's attention: `held`. Read by
    the shared processor (`CogVideoXAttnProcessor`), inside the compiled block: so nothing here
    differs from block to block but tensors, which dynamo takes as inputs, not guards.
    """

    active: bool = False  # inject at this step
    n_edit: int = 0  # the batch is [edit rows (n_edit)..., reference rows...]
    # Edit row j reads reference row ref_of[j]: a tensor on the rows' device, so that which row
    # reads which is data to a compiled block, not a guard.
    ref_of: torch.Tensor | None = None
    strength: float = 1.0
    # Replayed reference K/V by block (stored attention); None = reference rows are in the batch.
    stored: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    # Set around one block by its injection hook: this block injects now, and (stored) its K/V.
    here: bool = False
    layer_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    # Row groups: the batch rows this call carries (None = all), and the reference K/V the
    # reference group left for the edit groups of the same block.
    rows: range | None = None
    held: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class CaptureSlot:
    """K/V capture's share of the processor (engine.hooks.kv_capture): its block hook sets `on`
    for a forward to record, and the processor leaves row `row`'s K (after the key norm, before
    RoPE) and V in `k` and `v`, [heads, tokens, head_dim], for the hook to take."""

    row: int = -1
    on: bool = False
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None


ROPE_HEADS = 8  # heads per RoPE slice: RoPE computes in float32, so slicing bounds that copy
INJECT_HEADS = 8  # heads per injected attention call (48 in CogVideoX-5B)


def _rope_(x: torch.Tensor, text_len: int, rotary) -> None:
    """RoPE on the image tokens of x [B, heads, tokens, dim], in place, a few heads at a time."""
    from diffusers.models.embeddings import apply_rotary_emb

    if x.shape[2] == text_len:  # tokens split over processes: this one may hold text only
        return
    for h in range(0, x.shape[1], ROPE_HEADS):
        part = x[:, h : h + ROPE_HEADS, text_len:]
        part.copy_(apply_rotary_emb(part, rotary))


def _projected(attn, x: torch.Tensor, which: str, text_len: int, rotary, heads: slice | list[slice] | None = None) -> torch.Tensor:
    """q, k or v (`which`) as [B, heads, tokens, head_dim], after its norm and RoPE (q and k).

    With `heads` (a slice, or several in order), only those heads: the rows of the projection's
    weight that make them.
    """
    proj = getattr(attn, f"to_{which}")
    head_dim = proj.out_features // attn.heads
    if heads is None:
        y = proj(x)
    else:
        rows = [slice(h.start * head_dim, h.stop * head_dim) for h in ([heads] if isinstance(heads, slice) else heads)]
        weight, bias = (None if p is None else torch.cat([p[r] for r in rows]) if len(rows) > 1 else p[rows[0]] for p in (proj.weight, proj.bias))
        y = F.linear(x, weight, bias)
    y = y.view(x.shape[0], -1, y.shape[-1] // head_dim, head_dim).transpose(1, 2)
    norm = getattr(attn, f"norm_{which}", None)  # diffusers' Attention has norm_q and norm_k only
    if norm is not None:
        y = norm(y)
    if rotary is not None and which != "v":
        _rope_(y, text_len, rotary)
    return y


class Projection:
    """A block's attention input, and its q, k, v made from it: this process's tokens with every
    head, or with the tokens split over processes (`TokenSplit`) every token with this process's
    share of the heads, traded for with the others. `release` frees the input once projected."""

    def __init__(self, attn, x: torch.Tensor, text_len: int, rotary, split: TokenSplit) -> None:
        self.attn, self.x, self.text_len, self.rotary, self.split = attn, x, text_len, rotary, split
        self.heads = attn.heads // split.size
        self.head_dim = attn.to_q.out_features // attn.heads

    def __call__(self, which: str, heads: slice | None = None) -> torch.Tensor:
        """q, k or v of `heads` of this process's share (None: all of it) as [B, heads, tokens, head_dim]."""
        sp = self.split
        if not sp.on:
            return _projected(self.attn, self.x, which, self.text_len, self.rotary, heads)
        # The same heads of every process's share, for this process's tokens, then traded.
        whole = heads is None or (heads.start, heads.stop) == (0, self.heads)
        shares = None if whole else [slice(j * self.heads + heads.start, j * self.heads + heads.stop) for j in range(sp.size)]
        return sp.to_heads(_projected(self.attn, self.x, which, self.text_len, self.rotary, shares))

    def qkv(self, heads: slice | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self("q", heads), self("k", heads), self("v", heads)

    def slices(self) -> list[slice]:
        """This process's heads, a few per injected or grouped attention call."""
        return [slice(h, min(h + INJECT_HEADS, self.heads)) for h in range(0, self.heads, INJECT_HEADS)]

    def buffer(self) -> torch.Tensor:
        """An empty [B, tokens, heads, head_dim] that head slices are written into: flattening it
        for the output projection is then a view, not a copy."""
        tokens = self.split.total if self.split.on else self.x.shape[1]
        return self.x.new_empty(self.x.shape[0], tokens, self.heads, self.head_dim)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The output projection of [B, tokens, heads, head_dim] (traded back to this process's
        tokens first), as [B, tokens, width]."""
        return _output(self.attn, self.split.to_tokens(out) if self.split.on else out)

    def release(self) -> None:
        self.x = None


def _attend(qkv: list[torch.Tensor], kernel: str) -> torch.Tensor:
    """Self-attention as [B, tokens, heads, head_dim]. Empties `qkv`, so that q, k and v are
    freed before the heads are copied back together."""
    out = attend(*qkv, kernel)
    qkv.clear()
    return out


def _inject(out: torch.Tensor, heads: slice, q, k, v, ref_k, ref_v, index: torch.Tensor, strength: float, kernel: str) -> None:
    """Attention of q over its own keys joined with its reference's, the reference's logits
    raised by log(strength), for `heads`, written into `out` [B, tokens, heads, head_dim]. A
    kernel with LSEs runs the two key sets apart and merges them; else the joined keys and values,
    the largest tensors of an injected block, hence a few heads at a time."""
    ref_k, ref_v = ref_k[index, heads], ref_v[index, heads]
    if merges(kernel):
        out[:, :, heads] = merge(attend_lse(q, k, v, kernel), attend_lse(q, ref_k, ref_v, kernel), strength)
        return
    mask = _strength_mask(strength, k.shape[2], q.dtype, q.device)
    keys, values = torch.cat([k, ref_k], dim=2), torch.cat([v, ref_v], dim=2)
    del ref_k, ref_v
    # Sage takes no mask and returns no LSE: its biased calls are SDPA's.
    out[:, :, heads] = attend(q, keys, values, kernel if mask is None else "sdpa", mask)


def _output(attn, out: torch.Tensor) -> torch.Tensor:
    """The output projection of [B, tokens, heads, head_dim], as [B, tokens, width]."""
    return attn.to_out[1](attn.to_out[0](out.flatten(2)))


class CogVideoXAttnProcessor:
    """CogVideoX self-attention, the same arithmetic as diffusers' processor with a lower peak.

    diffusers applies RoPE to all 48 heads at once in float32, a transient about as large as
    a block's MLP activations at 17,776 tokens; here it runs in place, a few heads at a time.
    One instance serves every block (`set_attn_processor` with one object): features that change
    attention steer it through `injection` and `capture`, shared objects, never per block.
    """

    def __init__(self, kernel: str = "sdpa") -> None:
        # Idle objects rather than None when a feature is off: dynamo guards an attribute's type,
        # so None and an object would be two graphs more.
        self.injection = InjectionState()
        self.capture = CaptureSlot()
        self.kernel = kernel  # engine.hooks.attention.KERNELS: fixed for the model's life, one guard
        self.split = TokenSplit()  # set by engine.hooks.token_split while tokens are split

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        text_len = encoder_hidden_states.shape[1]
        out = self.joined(attn, [torch.cat([encoder_hidden_states, hidden_states], dim=1)], text_len, image_rotary_emb)
        return out[:, text_len:], out[:, :text_len]

    def joined(self, attn, x: list[torch.Tensor], text_len: int, rotary) -> torch.Tensor:
        """Attention over text and image tokens already joined, `x` = [input]; emptied, so that
        the input is freed once projected. The result is [B, tokens, width], text first."""
        st = self.injection
        if st.here:
            return _injected(st, Projection(attn, x.pop(), text_len, rotary, self.split), self.kernel)
        cap = self.capture
        if cap.on:  # never with tokens split (engine.stages.distributed refuses it)
            x = x.pop()
            k = _projected(attn, x, "k", text_len, None)
            cap.k = k[cap.row].clone()  # RoPE below writes into k
            if rotary is not None:
                _rope_(k, text_len, rotary)
            v = _projected(attn, x, "v", text_len, rotary)
            cap.v = v[cap.row]
            return _output(attn, _attend([_projected(attn, x, "q", text_len, rotary), k, v], self.kernel))
        p = Projection(attn, x.pop(), text_len, rotary, self.split)
        qkv = list(p.qkv())
        p.release()
        return p.output(_attend(qkv, self.kernel))


def shared_processor(transformer: torch.nn.Module) -> CogVideoXAttnProcessor:
    """The one cogedit processor every block's attention runs (set by the engine when it loads)."""
    found = {id(b.attn1.processor): b.attn1.processor for b in transformer.transformer_blocks}
    processor = next(iter(found.values()))
    if len(found) != 1 or not isinstance(processor, CogVideoXAttnProcessor):
        raise TypeError("the blocks must share one CogVideoXAttnProcessor: transformer.set_attn_processor(CogVideoXAttnProcessor())")
    return processor


KV_INJECTION = "cogedit_kv_injection"


@dataclass(frozen=True)
class KVInjectionConfig:
    """Which blocks inject (None = all) and the state the edit loop steers them with."""

    layers: tuple[int, ...] | None
    state: InjectionState


class KVInjectionHook(ModelHook):
    """On a chosen CogVideoX block: says, outside the compiled block, whether this block injects
    at this step and which stored K/V it reads; the shared processor does the rest."""

    def __init__(self, state: InjectionState, layer: int) -> None:
        super().__init__()
        self.state = state
        self.layer = layer

    def pre_forward(self, module, *args, **kwargs):
        st = self.state
        st.here = st.active
        st.layer_kv = st.stored[self.layer] if st.active and st.stored is not None else None
        return args, kwargs

    def post_forward(self, module, output):
        self.state.here, self.state.layer_kv = False, None
        return output


def _injected(st: InjectionState, p: Projection, kernel: str) -> torch.Tensor:
    """As `CogVideoXAttnProcessor.joined`, with the reference K/V injected."""
    if st.rows is not None and st.layer_kv is None:
        group = _edit_group if st.rows.start < st.n_edit else _reference_group
        return group(st, p, kernel)
    q, k, v = p.qkv()
    p.release()
    rows = q.shape[0]
    if st.layer_kv is not None:  # replayed K/V: every row in the call is an edit row
        n, (ref_k, ref_v) = rows, st.layer_kv
        index = torch.zeros(n, dtype=torch.long, device=k.device)
    else:  # the batch is [edit rows..., reference rows...]
        n, ref_k, ref_v = st.n_edit, k[st.n_edit :], v[st.n_edit :]
        index = st.ref_of
    # Each slice's output goes straight to its place in `out`, with no list of parts to join.
    out = q.new_empty(rows, q.shape[2], q.shape[1], q.shape[3])
    for heads in p.slices():
        _inject(out[:n], heads, q[:n, heads], k[:n, heads], v[:n, heads], ref_k, ref_v, index, st.strength, kernel)
    if n < rows:  # the reference rows in the batch attend to themselves only
        out[n:] = attend(q[n:], ref_k, ref_v, kernel)
    del q, k, v, ref_k, ref_v
    return p.output(out)


def _reference_group(st: InjectionState, p: Projection, kernel: str) -> torch.Tensor:
    """A row group's reference rows: they keep their whole K/V for the block's edit groups
    and attend to themselves, their queries a few heads at a time (the full q would add
    one more row-sized tensor to the lean plan's peak)."""
    k, v = p("k"), p("v")
    st.held = (k, v)
    out = p.buffer()
    for heads in p.slices():
        q = p("q", heads)
        out[:, :, heads] = attend(q, k[:, heads], v[:, heads], kernel)
    p.release()
    del q
    return p.output(out)


def _edit_group(st: InjectionState, p: Projection, kernel: str) -> torch.Tensor:
    """Edit rows of a row group against the held reference K/V, projecting a few heads at a
    time: rows run apart to save memory, and their full q/k/v would be the peak."""
    ref_k, ref_v = st.held
    index = st.ref_of[st.rows.start : st.rows.stop]
    out = p.buffer()
    for heads in p.slices():
        _inject(out, heads, *p.qkv(heads), ref_k, ref_v, index, st.strength, kernel)
    p.release()
    return p.output(out)


def _strength_mask(strength: float, own: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """A log-bias on the reference half of the joined keys; None at strength 1 (plain concatenation)."""
    if strength == 1.0:
        return None
    mask = torch.zeros(1, 1, 1, 2 * own, dtype=dtype, device=device)
    mask[..., own:] = math.log(strength)
    return mask


def apply_kv_injection(transformer: torch.nn.Module, config: KVInjectionConfig) -> None:
    """Register the injection hook on the chosen blocks and hand the shared processor the
    state; `remove_kv_injection` undoes both."""
    shared_processor(transformer).injection = config.state
    blocks = transformer.transformer_blocks
    for i in range(len(blocks)) if config.layers is None else config.layers:
        hooks.register(blocks[i], KVInjectionHook(config.state, i), KV_INJECTION)


def remove_kv_injection(transformer: torch.nn.Module) -> None:
    hooks.remove(transformer, KV_INJECTION)
    shared_processor(transformer).injection = InjectionState()
