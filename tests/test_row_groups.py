"""Row groups (the lean plan): every block runs a row at a time, with the same result."""

from __future__ import annotations

import pytest
import torch

import engine
import engine.hooks.row_groups as row_groups_module
from engine.hooks.injection import InjectionState
from engine.hooks.row_groups import row_groups
from tests.conftest import SMALL

PROMPTS = ["a watercolor painting", "a charcoal sketch"]


def test_groups_put_the_reference_rows_first():
    state = InjectionState(active=True, n_edit=4)
    assert row_groups(5, 1, state) == [range(4, 5), range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert row_groups(8, 3, state) == [range(4, 8), range(0, 3), range(3, 4)]
    state.active = False  # outside the window the batch holds edit rows only
    assert row_groups(4, 3, state) == [range(0, 3), range(3, 4)]
    assert row_groups(3, 2, None) == [range(0, 2), range(2, 3)]
    assert row_groups(3, 2, InjectionState(active=True, n_edit=3)) == [range(0, 2), range(2, 3)], "no reference row in the batch: no group for it"


@pytest.mark.parametrize(
    "options",
    [
        dict(inject_steps="0:0.5"),
        dict(inject_steps="0:1", inject_strength=0.5, inject_layers="1"),
        dict(inject_steps="0:0.5", reference="per-half"),
    ],
    ids=["shared", "strength-and-layers", "per-half"],
)
def test_lean_equals_staged(tiny_model, wide_clip, options, monkeypatch):
    inv = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL)
    staged = engine.edit(inv, PROMPTS, device="cpu", output="latents", **options)
    seen = []
    monkeypatch.setattr(row_groups_module, "row_groups", lambda *a: seen.append(row_groups(*a)) or seen[-1])
    lean = engine.edit(inv, PROMPTS, plan="lean", device="cpu", output="latents", **options)
    assert seen and all(len(g) == 1 for groups in seen for g in groups if g.start < 4), "edit rows ran one at a time"
    # The same per-row arithmetic in smaller calls: equal up to float32 summation order.
    torch.testing.assert_close(lean.latents, staged.latents, rtol=0, atol=1e-5)
    assert not torch.equal(staged.latents[0], staged.latents[1]), "the prompts differ, so rows were kept apart"


def test_lean_changes_nothing_but_the_grouping(tiny_model, wide_clip):
    """The lean plan needs no stored attention: its inversion is the staged one, shared in the cache."""
    staged = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL)
    lean = engine.invert(wide_clip, tiny_model, device="cpu", plan="lean", **SMALL)
    assert lean.id == staged.id and "attention" not in lean.manifest


def test_block_in_place_is_diffusers_block_bit_for_bit():
    """The lean plan's own block forward adds residuals in place; in bf16 it rounds as diffusers does."""
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    from engine.hooks.injection import CogVideoXAttnProcessor

    torch.manual_seed(0)
    block = CogVideoXBlock(dim=64, num_attention_heads=4, attention_head_dim=16, time_embed_dim=32).to(torch.bfloat16).eval()
    block.attn1.set_processor(CogVideoXAttnProcessor())
    hidden, text, temb = (torch.randn(*shape, dtype=torch.bfloat16) for shape in ((2, 40, 64), (2, 7, 64), (2, 32)))
    with torch.no_grad():
        want_hidden, want_text = block(hidden, text, temb)
        row_groups_module._block_in_place(block, hidden, text, temb, None)
    assert torch.equal(hidden, want_hidden) and torch.equal(text, want_text)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groups_inject_as_the_whole_batch_does_and_let_go_of_the_reference(dtype):
    """A block over row groups (reference group first, edit rows one at a time) injects as the
    block over the whole batch: with more heads than one injected call takes (two head slices,
    the second partial) and a strength bias. After the block the reference K/V it held is let go."""
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    from engine.hooks import registry as hooks
    from engine.hooks.injection import INJECT_HEADS, KV_INJECTION, CogVideoXAttnProcessor, KVInjectionHook
    from engine.hooks.row_groups import ROW_GROUPS, RowGroupConfig, RowGroupsHook

    heads = INJECT_HEADS + 2
    torch.manual_seed(0)
    block = CogVideoXBlock(dim=4 * heads, num_attention_heads=heads, attention_head_dim=4, time_embed_dim=8).to(dtype).eval()
    block.attn1.set_processor(processor := CogVideoXAttnProcessor())
    hidden, text, temb = (torch.randn(*shape, dtype=dtype) for shape in ((3, 6, 4 * heads), (3, 3, 4 * heads), (3, 8)))
    state = processor.injection = InjectionState(active=True, n_edit=2, ref_of=torch.tensor([0, 0]), strength=0.5)
    hooks.register(block, KVInjectionHook(state, 0), KV_INJECTION)
    with torch.no_grad():
        whole = block(hidden.clone(), text.clone(), temb)
        hooks.register(block, RowGroupsHook(RowGroupConfig(1, state)), ROW_GROUPS)
        hooks.register(block, KVInjectionHook(state, 0), KV_INJECTION + "-outer")  # outermost, as the edit registers them
        grouped = block(hidden.clone(), text.clone(), temb)
    for a, b in zip(grouped, whole):  # bf16: the dtype the lean plan runs in on a GPU
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 if dtype == torch.float32 else 0.1)
    assert state.rows is None and state.held is None


def test_the_blocks_must_share_one_cogedit_processor():
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

    from engine.hooks.injection import CogVideoXAttnProcessor, shared_processor

    model = torch.nn.Module()
    model.transformer_blocks = torch.nn.ModuleList(CogVideoXBlock(dim=8, num_attention_heads=2, attention_head_dim=4, time_embed_dim=8) for _ in range(2))
    message = r"^the blocks must share one CogVideoXAttnProcessor: transformer\.set_attn_processor\(CogVideoXAttnProcessor\(\)\)$"
    for processors in ((CogVideoXAttnProcessor(), CogVideoXAttnProcessor()), (CogVideoXAttnProcessor2_0(),) * 2):
        for block, processor in zip(model.transformer_blocks, processors):
            block.attn1.set_processor(processor)
        with pytest.raises(TypeError, match=message):
            shared_processor(model)
    one = CogVideoXAttnProcessor()
    for block in model.transformer_blocks:
        block.attn1.set_processor(one)
    assert shared_processor(model) is one


def test_final_norms_run_in_groups_with_the_rows_of_every_batch_sized_input():
    """The final norms' hook slices what has one entry per row, positional or keyword, and hands
    the rest (weights, numbers, None) over whole: groups of 2 over 3 rows give the plain call's result."""
    from engine.hooks import registry as hooks
    from engine.hooks.row_groups import RowsInPlaceHook

    class Norm(torch.nn.Module):  # the shape of diffusers' AdaLayerNorm call, with every kind of input
        def forward(self, x, scale, weight, eps, shift=None, bias=None):
            return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps) * (1 + scale[:, None]) + (0 if shift is None else shift[:, None])

    x, scale, shift = torch.randn(3, 5, 4), torch.randn(3, 4), torch.randn(3, 4)
    weight, bias = torch.randn(4), torch.randn(4)
    norm = Norm()
    want = norm(x, scale, weight, 1e-3, shift=shift, bias=bias)
    hooks.register(norm, RowsInPlaceHook(2), "rows")
    got = norm(x.clone(), scale, weight, 1e-3, shift=shift, bias=bias)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
