"""Reference K/V injection against attention written out by hand: only the chosen blocks injecting,
and no hook left behind by a failed edit. The injected attention itself (the strength's log-bias on
the reference logits only), kernel by kernel: tests/test_attention.py."""

from __future__ import annotations

import math

import pytest
import torch

from engine.stages.editing import Reference, ddim_edit
from engine.stages.settings import InjectSettings
from tests.test_engine import _scheduler_config, _transformer
from tests.test_inversion import LATENT, TEXT
from tests.test_structure import _tiny_transformer


def _by_hand(attn, x: torch.Tensor, text_len: int, rotary, ref_of: list[int], strength: float) -> torch.Tensor:
    """CogVideoX self-attention over joined text and image tokens `x` [rows, tokens, width], rows
    laid out [edit rows..., reference rows...]: edit row j takes a softmax over its own logits
    and those of reference row ref_of[j], the latter plus log(strength); reference rows attend
    to themselves. Projections, norms and RoPE as diffusers' CogVideoX processor."""
    from diffusers.models.embeddings import apply_rotary_emb

    rows, tokens, _ = x.shape
    heads = attn.heads

    def split(t):
        return t.view(rows, tokens, heads, -1).transpose(1, 2)  # [rows, heads, tokens, dim]

    q, k, v = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if rotary is not None:
        q = torch.cat([q[:, :, :text_len], apply_rotary_emb(q[:, :, text_len:], rotary)], 2)
        k = torch.cat([k[:, :, :text_len], apply_rotary_emb(k[:, :, text_len:], rotary)], 2)
    scale = 1 / math.sqrt(q.shape[-1])
    n_edit, out = len(ref_of), []
    for row in range(rows):
        own = q[row] @ k[row].transpose(-1, -2) * scale
        if row < n_edit:
            ref = n_edit + ref_of[row]
            joined = torch.cat([own, q[row] @ k[ref].transpose(-1, -2) * scale + math.log(strength)], -1)
            out.append(joined.softmax(-1) @ torch.cat([v[row], v[ref]], 1))
        else:
            out.append(own.softmax(-1) @ v[row])
    merged = torch.stack(out).transpose(1, 2).reshape(rows, tokens, -1)
    return attn.to_out[1](attn.to_out[0](merged))


def _attention_module():
    """One CogVideoX self-attention (2 heads of 16, q/k layer norms, as the 5B's blocks), random weights."""
    from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(32, dim_head=16, heads=2, qk_norm="layer_norm", eps=1e-6, bias=True, out_bias=True, processor=CogVideoXAttnProcessor2_0())
    for norm in (attn.norm_q, attn.norm_k):  # not the identity they start as
        torch.nn.init.normal_(norm.weight, 1.0, 0.3)
        torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    return attn.eval().requires_grad_(False)


class _InjectingProcessor:
    """A CogVideoX block's attention with one shared reference row at the end of the batch."""

    def __init__(self, strength: float) -> None:
        self.strength = strength

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        text_len = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], 1)
        out = _by_hand(attn, x, text_len, image_rotary_emb, [0] * (x.shape[0] - 1), self.strength)
        return out[:, text_len:], out[:, :text_len]


def _edit_inputs(steps: int):
    g = torch.Generator().manual_seed(2)
    init, cond, uncond, source = torch.randn(LATENT, generator=g), *(torch.randn(TEXT, generator=g) for _ in range(3))
    references = [torch.randn(LATENT, generator=g) for _ in range(steps)]  # the reference row of each step
    return init, cond, uncond, Reference(references.__getitem__, references.__getitem__, source), references


def test_only_the_chosen_layers_inject(tiny_model):
    """Block 1 injects (strength 0.5), block 0 runs diffusers' attention: against a sampling loop
    written out here with a hand-written injecting attention on block 1 only."""
    from diffusers import CogVideoXDDIMScheduler
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    steps, config = 3, _scheduler_config(tiny_model)
    init, cond, uncond, reference, references = _edit_inputs(steps)
    common = dict(vae_scale_spatial=8, uncond=uncond, guidance=6.0, reference=reference)
    transformer = _tiny_transformer(tiny_model)  # cogedit's shared processor, as the engine loads it
    ours = ddim_edit(transformer, init, cond, config, steps, inject=InjectSettings(layers=(1,), strength=0.5), **common)
    every_block = ddim_edit(transformer, init, cond, config, steps, inject=InjectSettings(strength=0.5), **common)

    independent = _transformer(tiny_model)
    independent.transformer_blocks[1].attn1.set_processor(_InjectingProcessor(0.5))
    scheduler = CogVideoXDDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    rotary = get_3d_rotary_pos_embed(16, ((0, 0), (6, 10)), (6, 10), LATENT[1])
    embeds = torch.cat([uncond, cond, reference.source_embeds])
    x = init
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            v = independent(torch.cat([x, x, references[i]]), embeds, t.expand(3), image_rotary_emb=rotary, return_dict=False)[0][:2]
            u, c = v.chunk(2)
            x = scheduler.step(u + 6.0 * (c - u), t, x, return_dict=False)[0]
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)
    assert (ours - every_block).abs().max() > 1e-3  # block 0's injection matters, so injecting there shows


def _hooks_left(model: torch.nn.Module) -> list[str]:
    return [f"{name}:{hook}" for name, m in model.named_modules() if (reg := getattr(m, "_diffusers_hook", None)) for hook in reg.hooks]


@pytest.mark.parametrize("row_group", [0, 1])
def test_a_failed_edit_leaves_no_hook_behind(tiny_model, row_group):
    """An edit that raises mid-step (here from its callback) takes its features off the model:
    no hook registered anywhere, and the forward is diffusers' own again, bit for bit."""
    model = _tiny_transformer(tiny_model)
    init, cond, uncond, reference, _ = _edit_inputs(2)
    x, text, t = torch.randn(2, *LATENT[1:]), torch.randn(2, *TEXT[1:]), torch.tensor([500, 500])
    with torch.no_grad():
        before = model(x, text, t, return_dict=False)[0]

    def fail(state):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        ddim_edit(model, init, cond, _scheduler_config(tiny_model), 2, vae_scale_spatial=8, uncond=uncond, reference=reference, row_group=row_group, callback=fail)
    assert _hooks_left(model) == []
    with torch.no_grad():
        assert torch.equal(model(x, text, t, return_dict=False)[0], before)
