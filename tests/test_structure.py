"""What issue 10 asked to hold: the cache key follows every setting that changes a result, the
inversion kernel matches an independent inverse-DDIM loop, options and flags are named right,
and the model features come off as cleanly as they go on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import engine
from cache.keys import stable_hash
from engine.errors import SettingsError
from engine.models.components import Runtime
from engine.models.model_info import inspect_model
from engine.stages.settings import InvertSettings
from engine.video.reader import FrameSettings, select_frame_indices
from engine.workflow import inversion_identity
from tests.conftest import SMALL

_BASE_FRAMES = FrameSettings(9, 0, 0, None, 96, 160)
_BASE_INVERT = InvertSettings(steps=4)


def _key(tiny_model, frames=_BASE_FRAMES, settings=_BASE_INVERT, runtime=None, video="a" * 64) -> str:
    info = inspect_model(tiny_model)
    selected = select_frame_indices(250, frames)  # a long clip: every frame setting picks other frames
    return stable_hash(inversion_identity(video, frames, selected, info, runtime or Runtime.default("cpu"), settings))


@pytest.mark.parametrize(
    "change",
    [
        {"frames": {"max_frames": 13}},
        {"frames": {"skip_start": 1}},
        {"frames": {"skip_end": 1}},
        {"frames": {"stride": 2}},
        {"frames": {"height": 112}},
        {"frames": {"width": 176}},
        {"invert": {"steps": 5}},
        {"invert": {"source_prompt": "people riding bikes"}},
        {"invert": {"source_prompt": "bikes", "negative_prompt": "blurry"}},  # CFG now in effect
        {"invert": {"method": "fixed-point", "iters": 1}},
        {"invert": {"method": "fixed-point", "iters": 2}},
        {"runtime": {"dtype": "bf16"}},
        {"runtime": {"compile": True}},
        {"video": "b" * 64},
    ],
    ids=lambda c: ",".join(f"{k}.{next(iter(v))}" if isinstance(v, dict) else k for k, v in c.items()),
)
def test_every_setting_that_changes_the_trajectory_changes_the_key(tiny_model, change):
    base = _key(tiny_model)
    frames = dataclasses.replace(_BASE_FRAMES, **change.get("frames", {}))
    settings = dataclasses.replace(_BASE_INVERT, **change.get("invert", {}))
    runtime = Runtime.default("cpu", **change.get("runtime", {}))
    assert _key(tiny_model, frames, settings, runtime, change.get("video", "a" * 64)) != base


def test_settings_that_change_nothing_keep_the_key(tiny_model):
    # Guidance without a distinct negative prompt changes nothing (u + w(c - u) = u).
    assert _key(tiny_model, settings=dataclasses.replace(_BASE_INVERT, guidance=9.0)) == _key(tiny_model)


def test_the_manifest_holds_everything_the_key_hashes(tiny_model, wide_clip):
    inv = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL)
    identity = inv.manifest["settings"]["identity"]
    assert stable_hash(identity) == inv.id
    assert identity["invert"]["source_prompt"] == "" and len(identity["frames"]["indices"]) == SMALL["frames"]


def _independent_inverse_ddim(model, latents, cond, steps, uncond=None, guidance=1.0):
    """Inverse DDIM written out from the formulas, with diffusers' stock attention: at each
    timestep (lowest first) predict v at the current latent, turn it into x0 and noise with
    the current noise level, and re-noise to the next level up (Song et al. 2021, eq. 12).
    With `uncond`, v is guided (Ho & Salimans 2022), each prediction a forward of its own."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    config = inspect_model(model).scheduler_config
    transformer = CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer").eval()
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    # Zero terminal SNR (Lin et al. 2024, algorithm 1): shift and scale sqrt(alpha_bar).
    root = alphas.sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    alphas = root**2
    stride = 1000 // steps
    timesteps = [round(1000 - i * 1000 / steps) - 1 for i in range(steps)][::-1]  # trailing, ascending
    _, f, _, h, w = latents.shape
    rotary = get_3d_rotary_pos_embed(16, ((0, 0), (h // 2, w // 2)), (h // 2, w // 2), f)
    x = latents.double()
    with torch.no_grad():
        for t in timesteps:
            now = alphas[t - stride] if t - stride >= 0 else torch.tensor(1.0, dtype=torch.float64)  # the clean latent
            nxt = alphas[t]
            v = _v(transformer, x, cond, t, rotary)
            if uncond is not None:
                u = _v(transformer, x, uncond, t, rotary)
                v = u + guidance * (v - u)
            x0 = now.sqrt() * x - (1 - now).sqrt() * v
            eps = now.sqrt() * v + (1 - now).sqrt() * x
            x = nxt.sqrt() * x0 + (1 - nxt).sqrt() * eps
    return x.float()


def _v(transformer, x, embeds, t, rotary):
    return transformer(x.float(), embeds, torch.tensor([t]), image_rotary_emb=rotary, return_dict=False)[0].double()


def test_ddim_invert_matches_an_independent_inverse_ddim_loop(tiny_model, wide_clip, tmp_path):
    from engine.stages.inversion import ddim_invert
    from tests.test_engine import _embed, _scheduler_config, _transformer

    inv = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL)
    cond = _embed(tiny_model, [""], tmp_path)[""]
    ours = ddim_invert(_transformer(tiny_model), inv.latents(), cond, _scheduler_config(tiny_model), SMALL["steps"], vae_scale_spatial=8)
    theirs = _independent_inverse_ddim(tiny_model, inv.latents(), cond, SMALL["steps"])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    reversed_order = (ours - inv.latents()).norm()
    assert reversed_order > 0  # the check would also see a loop that does nothing


def test_unknown_option_is_refused_before_any_work(tiny_model, wide_clip, _isolated_cache):
    with pytest.raises(SettingsError, match="unknown option.*stepz"):
        engine.run(wide_clip, tiny_model, ["a watercolor painting"], stepz=6, device="cpu")
    with pytest.raises(SettingsError, match="unknown option.*inject_step\\b"):
        engine.edit("0" * 16, ["x"], inject_step="0:1")
    assert not (_isolated_cache / "inversions").exists() or not list((_isolated_cache / "inversions").iterdir())


def test_run_takes_invert_settings_as_keywords(tiny_model, wide_clip, tmp_path):
    inv, out = engine.run(wide_clip, tiny_model, ["a watercolor painting"], device="cpu", output="latents", **SMALL)
    assert inv.steps == SMALL["steps"] and inv.manifest["summary"]["frames"] == SMALL["frames"]
    assert out.latents.shape[0] == 1


@pytest.mark.parametrize(("flag", "value"), [("attention_steps", "0-1"), ("attention_layers", "x")])
def test_store_errors_name_the_flag_the_user_typed(tiny_model, wide_clip, flag, value):
    with pytest.raises(SettingsError, match=f"--{flag.replace('_', '-')}"):
        engine.invert(wide_clip, tiny_model, device="cpu", attention_store="disk", **{flag: value}, **SMALL)


def test_features_come_off_cleanly(tiny_model):
    """Every hook is named and removable: after remove_x, the forward is diffusers' own again."""
    from engine.hooks import registry as hooks
    from engine.hooks.ff_chunking import FF_CHUNKING, FFChunkingConfig, apply_ff_chunking, remove_ff_chunking
    from engine.hooks.injection import KV_INJECTION, InjectionState, KVInjectionConfig, apply_kv_injection, remove_kv_injection
    from engine.hooks.kv_capture import KV_CAPTURE, KVCaptureConfig, apply_kv_capture, remove_kv_capture
    from engine.hooks.row_groups import ROW_GROUPS, RowGroupConfig, apply_row_groups, remove_row_groups

    model = _tiny_transformer(tiny_model)
    x, text, t = torch.randn(2, 3, 16, 12, 20), torch.randn(2, 226, 32), torch.tensor([500, 500])
    before = model(x, text, t, return_dict=False)[0]
    state = InjectionState()
    features = [
        (apply_ff_chunking, remove_ff_chunking, FFChunkingConfig(7), FF_CHUNKING, model.transformer_blocks[0]),
        (apply_kv_injection, remove_kv_injection, KVInjectionConfig(None, state), KV_INJECTION, model.transformer_blocks[1]),
        (apply_row_groups, remove_row_groups, RowGroupConfig(1, state), ROW_GROUPS, model.transformer_blocks[0]),
        (apply_kv_capture, remove_kv_capture, KVCaptureConfig((0,), frozenset({500}), lambda *a: None), KV_CAPTURE, model),
    ]
    for apply, _, config, name, where in features:
        apply(model, config)
        assert hooks.find(where, name) is not None
    assert hooks.find(model.transformer_blocks[0], KV_CAPTURE) is not None  # capture's block hook, under the same name
    on = model(x.clone(), text.clone(), t, return_dict=False)[0]
    for _, remove, _, name, where in features:
        remove(model)
        assert hooks.find(where, name) is None
    assert hooks.find(model.transformer_blocks[0], KV_CAPTURE) is None
    torch.testing.assert_close(on, before, rtol=0, atol=1e-5)  # inactive injection, exact features
    assert hooks.find(torch.nn.Linear(1, 1), FF_CHUNKING) is None  # a module no hook was ever registered on
    torch.testing.assert_close(model(x, text, t, return_dict=False)[0], before, rtol=0, atol=0)


def _tiny_transformer(model):
    from diffusers import CogVideoXTransformer3DModel

    from engine.hooks.injection import CogVideoXAttnProcessor

    transformer = CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer").eval().requires_grad_(False)
    transformer.set_attn_processor(CogVideoXAttnProcessor())
    return transformer


def test_cpu_stores_belong_to_their_handle(tiny_model, wide_clip):
    inv = engine.invert(wide_clip, tiny_model, device="cpu", attention_store="cpu", attention_steps="0:0.5", **SMALL)
    assert [s["where"] for s in inv.stores().values()] == ["cpu"]
    inv.release()
    assert inv.stores() == {}
    with pytest.raises(SettingsError, match="no stored attention"):
        engine.edit(inv, ["x"], inject_steps="0:0.5", reference="stored", device="cpu", output="latents")


# ------------------------------------------------------------------ issue 12: what a new user hits


def test_requests_that_select_the_same_frames_share_an_entry_and_say_so(tiny_model, wide_clip, caplog):
    """the wide clip has 131 frames; skipping 122 leaves 9, all used whether 9 or 17 are asked for."""
    small = {k: v for k, v in SMALL.items() if k != "frames"}
    asked_17 = engine.invert(wide_clip, tiny_model, device="cpu", frames=17, skip_start=122, **small)
    assert "using 9 frames, not the 17 asked for: 131 frames in the clip after --skip-start/--skip-end" in caplog.text
    asked_9 = engine.invert(wide_clip, tiny_model, device="cpu", frames=9, skip_start=122, **small)
    assert asked_9.id == asked_17.id


def test_edits_with_other_settings_never_collide(tiny_model, wide_clip, tmp_path, caplog):
    inv = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL)
    reporter = engine.Reporter()
    a = engine.edit(inv, ["a watercolor painting"], device="cpu", out_dir=tmp_path, inject_steps="0:0.5", reporter=reporter)
    edit_phase = next(r for r in reporter.records if r.name == "edit")
    assert edit_phase.cache_hit is None and edit_phase.detail.startswith(f"from inversion {inv.id[:12]}")  # reused, not a hit
    b = engine.edit(inv, ["a watercolor painting"], device="cpu", out_dir=tmp_path, inject_steps="0:1", seed=3)
    assert a.videos[0] != b.videos[0] and a.videos[0].exists() and b.videos[0].exists()
    assert "--seed 3 has no effect" in caplog.text


def test_a_damaged_file_is_caught_on_a_cache_hit(tiny_model, wide_clip):
    from cache.errors import CacheCorruptError

    inv = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL)
    step = inv.paths.step_file(1)
    step.write_bytes(step.read_bytes()[:-10])
    with pytest.raises(CacheCorruptError, match=r"trajectory/step_0001.safetensors is missing or has the wrong size.*cogedit cache rm"):
        engine.invert(wide_clip, tiny_model, device="cpu", **SMALL)


# ------------------------------------------------------ issue 16: the edit's side of the keys

# A change of each edit option that changes the edited pixels: (edit options, runtime, the base it changes).
_EDIT_CHANGES = {
    "negative_prompt": ({"negative_prompt": "blurry"}, {}, {}),
    "guidance": ({"guidance": 7.0}, {}, {}),
    "init": ({"init": "random"}, {}, {}),
    "seed": ({"init": "random", "seed": 3}, {}, {"init": "random"}),
    "inject_steps": ({"inject_steps": "0:0.5"}, {}, {}),
    "inject_layers": ({"inject_layers": "0"}, {}, {}),
    "inject_strength": ({"inject_strength": 0.5}, {}, {}),
    "reference": ({"reference": "per-half"}, {}, {}),
    "compile": ({}, {"compile": True}, {}),
    "fp8": ({}, {"fp8": True}, {}),
    "attention": ({}, {"attention": "fa4"}, {}),  # FA4 rounds differently, as compiled kernels do
    "attention sage": ({}, {"attention": "sage"}, {}),  # lossy
    "plan": ({}, {"plan": "int8"}, {}),
    "plan nf4": ({}, {"plan": "nf4"}, {}),
}
# Edit options that leave the pixels as they are, and why.
_EDIT_SAME = {
    "batch": "a row's result does not depend on its pass (test_k_prompts_in_one_pass_equal_single_runs)",
    "vram": "picks a plan; the plan is what counts",
    "device": "where it runs, as for the inversion's id",
    "dtype": "an edit runs in its inversion's dtype, which the inversion's id holds",
    "model": "the same model again, in another folder (the edit checks its key)",
    "fps": "the mp4's frame rate, not its frames",
    "out_dir": "where the files go",
    "force": "whether existing files are overwritten",
    "skip_existing": "whether existing files are kept",
    "gpus": "how many processes share the work: one GPU's result up to rounding (test_split_run_equals_one_process_run)",
    "output": "what is returned: files, frames or latents",
    "negative_from_source": "engine.edit turns it into negative_prompt (keyed), the inversion's source prompt: the same file as typing it (tests/test_webui.py)",
}


def _edit_stem(tiny_model, options: dict, runtime: dict) -> str:
    from engine.models.plans import PLANS
    from engine.options import EditOptions
    from engine.workflow import _edit_settings, edit_stem

    settings = _edit_settings(EditOptions(**options), ("a watercolor painting",), inspect_model(tiny_model))
    # Built directly: the int8 and nf4 plans need a CUDA GPU to run, not to be named.
    runtime = dict(runtime)  # a copy: the parameters are shared by reruns in one process (mutmut's)
    plan = PLANS[runtime.pop("plan", "staged")]
    return edit_stem("f" * 32, settings, Runtime("cpu", torch.float32, plan, **runtime))


@pytest.mark.parametrize("change", list(_EDIT_CHANGES))
def test_every_edit_setting_that_changes_the_pixels_changes_the_file_names(tiny_model, change):
    options, runtime, base = _EDIT_CHANGES[change]
    assert _edit_stem(tiny_model, {**base, **options}, runtime) != _edit_stem(tiny_model, base, {})


# Keyed once the inversion's frames are known: engine.edit puts the mask's digest in the settings.
_EDIT_MASKS = {"mask", "mask_box", "mask_box_end", "mask_fit", "mask_paste"}


def test_a_masks_digest_changes_the_file_names(tiny_model):
    from engine.options import EditOptions
    from engine.workflow import _edit_settings, edit_stem

    settings = _edit_settings(EditOptions(), ("a watercolor painting",), inspect_model(tiny_model))
    runtime = Runtime("cpu", torch.float32)
    stems = {edit_stem("f" * 32, dataclasses.replace(settings, mask=m), runtime) for m in (None, "a" * 16, "b" * 16)}
    assert len(stems) == 3  # that engine.edit passes the digest: tests/test_masks.py's output-name test
    pasted = _edit_settings(EditOptions(mask_paste=True), ("a watercolor painting",), inspect_model(tiny_model))
    assert edit_stem("f" * 32, dataclasses.replace(pasted, mask="a" * 16), runtime) not in stems  # the paste changes the pixels
    assert edit_stem("f" * 32, pasted, runtime) in stems  # and without a mask it has nothing to paste through


def test_every_edit_option_is_keyed_or_said_not_to_change_the_pixels():
    from engine.options import EditOptions, names

    assert names(EditOptions) == {c.split()[0] for c in _EDIT_CHANGES} | set(_EDIT_SAME) | _EDIT_MASKS


def test_the_model_libraries_load_with_their_noisy_loggers_quiet():
    """torchao's and bitsandbytes' import-time lines are nothing a user can act on (engine.hooks.libraries)."""
    import logging

    from engine.hooks import libraries

    for name in libraries._NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    libraries.import_model_libraries.cache_clear()
    libraries.import_model_libraries()
    assert {name: logging.getLogger(name).level for name in libraries._NOISY_LOGGERS} == dict.fromkeys(libraries._NOISY_LOGGERS, logging.ERROR)
    assert logging.getLogger().level != logging.ERROR, "only those loggers"
