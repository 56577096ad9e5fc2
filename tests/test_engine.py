"""The engine's numerical promises on the tiny checkpoint (CPU, float32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import engine
from engine.models import components
from engine.stages.inversion import ddim_invert
from tests.conftest import SMALL


def _transformer(model):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer").eval()


def _scheduler_config(model):
    return engine.inspect_model(model).scheduler_config


def _embed(model, prompts, tmp_path):
    from cache.layout import CacheLayout
    from engine.stages.embed import embed_prompts

    info = engine.inspect_model(model)
    return embed_prompts(prompts, info, engine.Runtime.default("cpu"), CacheLayout(tmp_path / "emb"))


@pytest.fixture
def inversion(tiny_model, wide_clip):
    return engine.invert(wide_clip, tiny_model, device="cpu", **SMALL)


def test_stages_load_one_component_at_a_time(tiny_model, wide_clip, tmp_path):
    components.LOAD_EVENTS.clear()
    engine.run(wide_clip, tiny_model, ["a watercolor painting"], **SMALL, device="cpu", out_dir=tmp_path)
    assert components.LOAD_EVENTS == [
        ("vae", ["vae"]),  # encode
        ("text_encoder", ["text_encoder"]),  # source prompt; the VAE is gone
        ("transformer", ["transformer"]),  # invert; T5 is gone
        ("text_encoder", ["text_encoder"]),  # edit prompts
        ("transformer", ["transformer"]),  # edit
        ("vae", ["vae"]),  # decode; the transformer is gone
    ]
    assert components.alive() == []


def test_second_inversion_is_a_cache_hit_that_loads_nothing(tiny_model, wide_clip):
    first = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL)
    components.LOAD_EVENTS.clear()
    reporter = engine.Reporter()
    second = engine.invert(wide_clip, tiny_model, device="cpu", reporter=reporter, **SMALL)
    assert second.id == first.id
    assert components.LOAD_EVENTS == []
    assert [r.cache_hit for r in reporter.records if r.name == "invert"] == [True]


def test_a_first_inversion_reports_each_phase_as_work_done_and_counts_its_steps(tiny_model, wide_clip, tmp_path):
    """The run table's lines: what was computed (not a cache hit), what it made, and the invert
    phase's bar over every step; the same inversion again is one cache hit."""
    told = []
    reporter = engine.Reporter(listener=lambda name, done, steps: told.append((name, done, steps)))
    engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path, reporter=reporter, **SMALL)
    lines = {r.name: (r.cache_hit, r.detail, len(r.advances)) for r in reporter.records}
    steps = SMALL["steps"]
    assert lines["encode"] == (False, "9 frames -> latents (3, 16, 12, 20)", 0)
    assert lines["embed"] == (False, "0/1 prompts cached", 1)
    assert lines["invert"] == (False, "1 row(s), attention sdpa", steps) and told[-1] == ("invert", steps, steps)
    reporter = engine.Reporter()
    again = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path, reporter=reporter, **SMALL)
    assert [(r.name, r.cache_hit, r.detail) for r in reporter.records if r.name != "video"] == [("invert", True, f"{again.id[:12]} cached")]


def test_edit_from_cache_equals_one_shot_run_bit_for_bit(tiny_model, wide_clip, tmp_path):
    prompts = ["a watercolor painting", "a charcoal sketch"]
    inv, one_shot = engine.run(wide_clip, tiny_model, prompts, **SMALL, device="cpu", out_dir=tmp_path / "a", inject_steps="0:0.5")
    components.LOAD_EVENTS.clear()
    again = engine.edit(inv.id, prompts, device="cpu", out_dir=tmp_path / "b", inject_steps="0:0.5")
    assert torch.equal(one_shot.latents, again.latents)
    assert "vae" not in [name for name, _ in components.LOAD_EVENTS[:-1]]  # only the decoder, at the end


def test_resumed_inversion_equals_uninterrupted_bit_for_bit(tiny_model, wide_clip, tmp_path):
    steps = 6

    def stop_after_2(state):
        if state["i"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / "a", callback=stop_after_2, **{**SMALL, "steps": steps})
    seen, told = [], []
    reporter = engine.Reporter(listener=lambda name, done, total: told.append((name, done, total)))
    resumed = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / "a", callback=lambda s: seen.append(s["i"]), reporter=reporter,
                            **{**SMALL, "steps": steps})
    assert seen == [3, 4, 5]  # steps 0-2 were finished and cached
    # The run table says where it went on from, and the bar starts there
    lines = {r.name: (r.cache_hit, r.detail) for r in reporter.records}
    assert lines["invert"] == (False, "resumed at step 3, attention sdpa") and lines["encode"] == (True, "latents cached")
    assert [t for t in told if t[0] == "invert"] == [("invert", 0, 6), ("invert", 3, 6), ("invert", 4, 6), ("invert", 5, 6), ("invert", 6, 6)]
    fresh = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / "b", **{**SMALL, "steps": steps})
    assert resumed.id == fresh.id
    for a, b in zip(resumed.trajectory(), fresh.trajectory(), strict=True):
        assert torch.equal(a, b)


def test_cfg_free_inversion_equals_cfg_with_equal_prompts(tiny_model, inversion, tmp_path):
    transformer = _transformer(tiny_model)
    emb = _embed(tiny_model, [""], tmp_path)[""]
    common = dict(scheduler_config=_scheduler_config(tiny_model), steps=4, vae_scale_spatial=8)
    one_row = ddim_invert(transformer, inversion.latents(), emb, **common)
    two_rows = ddim_invert(transformer, inversion.latents(), emb, uncond=emb, guidance=6.0, **common)
    torch.testing.assert_close(one_row, two_rows, rtol=0, atol=1e-4)
    # and the cached trajectory is the one-row run
    torch.testing.assert_close(inversion.trajectory()[-1], one_row, rtol=0, atol=0)


def _plain_ddim(model, init, cond, uncond, guidance, steps):
    """Plain CogVideoX DDIM sampling written out here, with diffusers' stock attention."""
    from diffusers import CogVideoXDDIMScheduler
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    transformer = _transformer(model)
    scheduler = CogVideoXDDIMScheduler.from_config(_scheduler_config(model))
    scheduler.set_timesteps(steps)
    _, f, _, h, w = init.shape
    rotary = get_3d_rotary_pos_embed(16, ((0, 0), (h // 2, w // 2)), (h // 2, w // 2), f)
    x = init
    for t in scheduler.timesteps:
        v = transformer(torch.cat([x, x]), torch.cat([uncond, cond]), t.expand(2), image_rotary_emb=rotary, return_dict=False)[0].float()
        u, c = v.chunk(2)
        x = scheduler.step(u + guidance * (c - u), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("knob", [{"inject_strength": 0.0}, {"inject_steps": "0:0"}, {"inject_layers": ""}])
def test_no_injection_equals_plain_ddim(tiny_model, inversion, tmp_path, knob):
    if knob.get("inject_layers") == "":
        knob = {"inject_layers": ()}
    out = engine.edit(inversion, ["a watercolor painting"], device="cpu", output="latents", **knob)
    emb = _embed(tiny_model, ["a watercolor painting", ""], tmp_path)
    plain = _plain_ddim(tiny_model, inversion.trajectory()[-1], emb["a watercolor painting"], emb[""], 6.0, inversion.steps)
    torch.testing.assert_close(out.latents, plain, rtol=0, atol=1e-5)


class _UpstreamProcessor:
    """Upstream's per-half algorithm, written independently: [x_u, x_c, ref_u, ref_c] rows;
    each edit row attends to its own tokens followed by its half's reference tokens."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        text = encoder_hidden_states.shape[1]
        x = torch.cat([encoder_hidden_states, hidden_states], 1)
        b, n, _ = x.shape
        heads = attn.heads

        def split(t):
            return t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x))
        q, k = attn.norm_q(q), attn.norm_k(k)
        q = torch.cat([q[:, :, :text], apply_rotary_emb(q[:, :, text:], image_rotary_emb)], 2)
        k = torch.cat([k[:, :, :text], apply_rotary_emb(k[:, :, text:], image_rotary_emb)], 2)
        half = b // 2
        edit = F.scaled_dot_product_attention(q[:half], torch.cat([k[:half], k[half:]], 2), torch.cat([v[:half], v[half:]], 2))
        ref = F.scaled_dot_product_attention(q[half:], k[half:], v[half:])
        out = torch.cat([edit, ref]).transpose(1, 2).reshape(b, n, -1)
        out = attn.to_out[0](out)
        return out[:, text:], out[:, :text]


def test_per_half_reference_equals_upstream_algorithm(tiny_model, inversion, tmp_path):
    from diffusers import CogVideoXDDIMScheduler
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    prompt = "a watercolor painting"
    ours = engine.edit(inversion, [prompt], reference="per-half", device="cpu", output="latents")

    transformer = _transformer(tiny_model)
    for block in transformer.transformer_blocks:
        block.attn1.set_processor(_UpstreamProcessor())
    emb = _embed(tiny_model, [prompt, ""], tmp_path)
    embeds = torch.cat([emb[""], emb[prompt]] * 2)
    scheduler = CogVideoXDDIMScheduler.from_config(_scheduler_config(tiny_model))
    scheduler.set_timesteps(inversion.steps)
    trajectory = inversion.trajectory()
    _, f, _, h, w = trajectory[0].shape
    rotary = get_3d_rotary_pos_embed(16, ((0, 0), (h // 2, w // 2)), (h // 2, w // 2), f)
    x = trajectory[-1]
    for i, t in enumerate(scheduler.timesteps):
        ref = list(reversed(trajectory))[i]
        rows = torch.cat([x, x, ref, ref])
        v = transformer(rows, embeds, t.expand(4), image_rotary_emb=rotary, return_dict=False)[0].float()
        u, c = v[:2].chunk(2)
        x = scheduler.step(u + 6.0 * (c - u), t, x, return_dict=False)[0]
    torch.testing.assert_close(ours.latents, x, rtol=0, atol=1e-5)


def test_k_prompts_in_one_pass_equal_single_runs(inversion):
    prompts = ["a watercolor painting", "a charcoal sketch", "snow at night"]
    together = engine.edit(inversion, prompts, batch=3, device="cpu", output="latents", inject_steps="0:0.5")
    singles = [engine.edit(inversion, [p], device="cpu", output="latents", inject_steps="0:0.5").latents for p in prompts]
    torch.testing.assert_close(together.latents, torch.cat(singles), rtol=0, atol=1e-5)


def test_injection_changes_the_edit(inversion):
    on = engine.edit(inversion, ["a charcoal sketch"], device="cpu", output="latents")
    off = engine.edit(inversion, ["a charcoal sketch"], device="cpu", output="latents", inject_strength=0.0)
    half = engine.edit(inversion, ["a charcoal sketch"], device="cpu", output="latents", inject_strength=0.5)
    assert (on.latents - off.latents).abs().max() > 1e-3
    assert (half.latents - on.latents).abs().max() > 1e-4


def test_round_trip_reconstructs_the_encoded_latents(tiny_model, wide_clip):
    """Invert, then sample back with the source prompt, no guidance and no injection."""
    source_prompt = "people riding wide_clip"
    errors = {}
    for steps in (10, 50):
        inv = engine.invert(wide_clip, tiny_model, device="cpu", source_prompt=source_prompt, guidance=1.0, **{**SMALL, "steps": steps})
        out = engine.edit(inv, [source_prompt], guidance=1.0, inject_strength=0.0, device="cpu", output="latents")
        source = inv.latents()
        errors[steps] = ((out.latents - source).norm() / source.norm()).item()
    # Measured on this tiny random model (CPU, fp32): 0.69 at 10 steps, 0.19 at 50. DDIM
    # inversion's error is first order in the step size, so it must shrink about 1/steps.
    assert errors[50] < 0.25, errors
    assert errors[50] < errors[10] / 2.5, errors


def test_compiled_blocks_stay_within_tolerance(tiny_model, wide_clip, tmp_path):
    """--compile (regional torch.compile) changes rounding only: measured 7e-7 / 4e-6 on CPU."""
    plain = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / "a", **SMALL)
    compiled = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / "b", compile=True, **SMALL)
    assert compiled.id != plain.id  # compiled kernels round differently: their own cache entry
    assert list((tmp_path / "b" / "compile").glob("*.bin")), "the compiled kernels are kept in the cache"
    for a, b in zip(plain.trajectory(), compiled.trajectory(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    edit_plain = engine.edit(plain, ["a watercolor painting"], device="cpu", output="latents", inject_steps="0:0.5")
    edit_compiled = engine.edit(plain, ["a watercolor painting"], device="cpu", output="latents", inject_steps="0:0.5", compile=True)
    torch.testing.assert_close(edit_compiled.latents, edit_plain.latents, rtol=0, atol=1e-4)



def test_an_edit_reports_its_passes_and_steps_and_hands_the_callback_every_step(tiny_model, wide_clip, tmp_path):
    """The edit's line in the run table (what ran, in how many passes, with which mask) and its bar
    over every step of every pass; the callback sees each step of each pass as the edit's."""
    inv = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path, **SMALL)
    told, states = [], []
    reporter = engine.Reporter(listener=lambda name, done, steps: told.append((name, done, steps)))
    result = engine.edit(inv, ["a cat", "a dog", "a bird", "a fish"], device="cpu", cache_dir=tmp_path, reporter=reporter, callback=states.append, batch=3,
                         output="frames", mask_box="0,0,0.5,1")
    steps = SMALL["steps"]
    decode = next(r for r in reporter.records if r.name == "decode")
    assert (decode.detail, len(decode.advances), result.frames.shape) == ("4 video(s) decoded", 4, (4, 9, 96, 160, 3))  # 4 prompts, 3 latent frames
    assert told[-1] == ("decode", 4, 4)
    line = next(r for r in reporter.records if r.name == "edit")
    assert line.detail == f"from inversion {inv.id[:12]}: 4 prompt(s) in 2 pass(es), reference shared, attention sdpa, local (box 0,0,0.5,1)"
    assert ("edit", 2 * steps, 2 * steps) in told and len(line.advances) == 2 * steps
    assert [(s["phase"], s["i"]) for s in states] == [("edit", i) for _ in range(2) for i in range(steps)]

