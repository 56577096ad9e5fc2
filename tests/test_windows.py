"""Clips longer than the model's window: the windows, their blending, and the windowed inversion
and edit on the tiny model (window 9 frames = 3 latent frames, overlap 1)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import engine
from engine.errors import SettingsError
from engine.models.denoiser import predict as inversion_predict
from engine.stages.windows import Windowing, blend_weights, blended, default_overlap, state_frames, window_calls, window_spans
from tests.conftest import SMALL

SIZE = {k: v for k, v in SMALL.items() if k != "frames"}
LONG = dict(SIZE, frames=17, steps=2, window_overlap=1)  # 5 latent frames: windows (0, 3) and (2, 5), the fewest
PROMPT = ["a watercolor painting"]


@settings(deadline=None, max_examples=60)
@given(st.integers(1, 60), st.integers(2, 16), st.data())
def test_windows_cover_every_frame_and_share_it_alike(frames, length, data):
    overlap = data.draw(st.integers(1, length - 1))
    spans = window_spans(frames, length, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == frames  # the last window aligned to the end
    assert all(e - s == min(length, frames) for s, e in spans)  # every window is one model call of the model's length
    assert all(b[0] - a[0] <= length - overlap for a, b in zip(spans, spans[1:], strict=False))  # neighbours share >= overlap
    calls = window_calls(spans)
    anchors = len(spans) - 1
    assert state_frames(spans) == frames + anchors and all(len(range(frames)[c] if isinstance(c, slice) else c) == min(length, frames) for c in calls)
    for k, (s, e) in enumerate(spans[1:]):  # a later window: its own anchor, then its span less its first frame
        assert calls[k + 1] == [frames + k, *range(s + 1, e)]
    weights = blend_weights(spans)
    torch.testing.assert_close(weights.sum(0), torch.ones(frames + anchors), rtol=0, atol=1e-6)
    for w, (s, e) in enumerate(spans):
        clip = weights[w, :frames]
        assert (clip[: s + (w > 0)] == 0).all() and (clip[e:] == 0).all()
        assert (weights[w, frames:] > 0).sum() == (w > 0) and (w == 0 or weights[w, frames + w - 1] == 1)  # each anchor is its window's alone
    covered = (weights > 0).sum(0)
    assert torch.equal(weights, (weights > 0) / covered)  # every window covering a frame alike


def test_windows_of_the_5b_and_the_overlap_check():
    assert default_overlap(13) == 4 and default_overlap(5) == 3 and default_overlap(3) == 2 and default_overlap(2) == 1
    assert window_spans(25, 13, 4) == [(0, 13), (6, 19), (12, 25)]  # 97 frames: spread evenly, the last one ending the clip
    assert window_spans(13, 13, 4) == [(0, 13)] and window_spans(7, 13, 4) == [(0, 7)]
    assert Windowing(13, 4).count(49) == 5
    with pytest.raises(SettingsError, match="--window-overlap must be between 1 and 12"):
        Windowing(13, 13)
    with pytest.raises(SettingsError, match="--window-overlap must be between 1 and 12"):
        Windowing(13, 0)  # a later window leaves its first frame to the one before: overlap 0 would leave it uncovered


def test_blended_prediction_of_a_linear_model_is_the_model_on_the_whole_clip():
    """Windows that agree (a per-frame function) blend back to the same prediction everywhere;
    one window covering the clip is the call itself, bit for bit."""
    spans = window_spans(11, 5, 2)
    x = torch.randn(2, state_frames(spans), 3, 4, 4)  # the clip's 11 latent frames and 2 anchors
    torch.testing.assert_close(blended(lambda w, frames: 3 * x[:, frames], spans), 3 * x, rtol=0, atol=1e-6)
    assert blended(lambda w, frames: x[:, frames] * 1.0, [(0, 11)]).equal(x[:, :11])


def test_each_windows_reference_row_is_its_own_slice_of_the_trajectory(tiny_model):
    """Every transformer call of a windowed edit gets that window's frames of the edit rows and,
    as its reference row, the same window's frames of the trajectory."""
    from diffusers import CogVideoXTransformer3DModel

    from engine.hooks.injection import CogVideoXAttnProcessor
    from engine.stages.editing import _reference, ddim_edit

    model = CogVideoXTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer").eval()
    model.set_attn_processor(CogVideoXAttnProcessor())
    info = engine.inspect_model(tiny_model)
    g = torch.Generator().manual_seed(0)
    spans = window_spans(5, 3, 1)  # (0, 3), (2, 5): the state is 5 latent frames and one anchor
    trajectory = [torch.randn(1, 6, 16, 12, 20, generator=g) for _ in range(2)]
    clean = torch.randn(1, 6, 16, 12, 20, generator=g)
    text = torch.randn(1, 226, 32, generator=g)
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["hidden_states"].clone()), with_kwargs=True)
    ddim_edit(model, trajectory[-1], text, info.scheduler_config, 2, vae_scale_spatial=8, reference=_reference(trajectory, clean, text, None, "cpu"), spans=spans)
    assert len(seen) == 2 * len(spans)
    for call, rows in enumerate(seen):
        step, frames = call // len(spans), [[0, 1, 2], [5, 3, 4]][call % len(spans)]  # the second window: its anchor, then 3 and 4
        replayed = trajectory[0] if step == 0 else clean  # edit step i replays inversion step steps-1-i's input
        assert rows.shape[1] == 3 and rows[-1:].equal(replayed[:, frames])


def test_a_long_clip_inverts_and_edits_in_windows_to_its_own_frame_count(tiny_model, wide_clip, caplog, monkeypatch):
    import engine.stages.inversion as inversion

    frames_seen = []
    monkeypatch.setattr(inversion, "predict", lambda model, rows, *args: frames_seen.append(rows.shape[1]) or inversion_predict(model, rows, *args))
    inv = engine.invert(wide_clip, tiny_model, device="cpu", **LONG)
    assert frames_seen == [3, 3] * LONG["steps"]  # every inversion step: one call per window of 3 latent frames
    assert inv.entry.manifest["summary"]["windows"] == [[0, 3], [2, 5]]
    # the state: the clip's 5 latent frames, then the second window's anchor, frame 8 encoded alone
    from diffusers import AutoencoderKLCogVideoX

    from engine.stages.encode import encode_frames
    from engine.video.reader import to_model_input

    vae = AutoencoderKLCogVideoX.from_pretrained(tiny_model, subfolder="vae").eval()
    latents = inv.latents()
    assert latents.shape[1] == 6 and latents[:, 5:].equal(encode_frames(vae, to_model_input(inv.frames()[8:9])).to(latents.dtype))
    assert "17 frames at" in caplog.text and "in 2 overlapping windows of 9 frames (1 latent frames shared)" in caplog.text
    # K prompts in one pass, and each alone: the same rows (windows change nothing about batching)
    both = engine.edit(inv, ["a cat", "a dog"], device="cpu", output="frames")
    alone = engine.edit(inv, ["a dog"], device="cpu", output="latents")
    assert both.frames.shape[:2] == (2, 17)
    torch.testing.assert_close(both.latents[1:], alone.latents, rtol=0, atol=1e-5)
    # a mask over the whole long clip: outside it the edit ends on the source's own latents
    masked = engine.edit(inv, ["a cat"], device="cpu", output="latents", mask_box="0,0,0.5,1")
    clean = inv.entry.load(inv.paths.latents, "latents")
    assert masked.latents.shape[1] == 5 and masked.latents[..., 12:].equal(clean[:, :5, ..., 12:].to(masked.latents.dtype))
    pasted = engine.edit(inv, ["a cat"], device="cpu", output="frames", mask_box="0,0,0.5,1", mask_paste=True).frames[0]
    assert pasted.shape[0] == 17 and (pasted[:, :, 81:] == inv.frames().numpy()[:, :, 81:]).all()  # every frame of the clip pasted
    # a windowed entry of an earlier cogedit (latents without the anchors) is refused with the fix
    inv.entry.manifest["summary"]["latent_shape"][1] = 5
    with pytest.raises(SettingsError, match=f"inversion {inv.id[:12]} was made by an earlier cogedit.*invert the clip again"):
        engine.edit(inv, ["a cat"], device="cpu", output="latents")
    # another overlap is another inversion; a clip of one window keeps today's id (no window fields)
    other = engine.invert(wide_clip, tiny_model, device="cpu", **dict(LONG, window_overlap=2))
    assert other.id != inv.id and other.entry.manifest["summary"]["windows"] == [[0, 3], [1, 4], [2, 5]]
    short = engine.invert(wide_clip, tiny_model, device="cpu", **dict(LONG, frames=9))
    assert engine.invert(wide_clip, tiny_model, device="cpu", **dict(LONG, frames=9, window_overlap=2)).id == short.id
    assert "window" not in short.entry.manifest["settings"]["identity"]["invert"] and "windows" not in short.entry.manifest["summary"]


def test_a_windowed_inversion_resumes_from_its_last_step_bit_for_bit(tiny_model, wide_clip, tmp_path):
    whole = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / "a", **LONG)

    def stop(state):
        if state["phase"] == "invert" and state["i"] == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / "b", callback=stop, **LONG)
    reporter = engine.Reporter()
    resumed = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / "b", reporter=reporter, **LONG)
    assert "resumed at step 1" in next(r for r in reporter.records if r.name == "invert").detail
    assert all(a.equal(b) for a, b in zip(whole.trajectory(), resumed.trajectory(), strict=True))


def test_frames_all_reads_every_frame_at_the_models_rate_and_gives_them_all_back(tiny_model, wide_clip):
    """31 frames at 25 fps read at 8 fps are 10 frames, padded to 13 (4k+1) for the VAE; the edit has the 10."""
    inv = engine.invert(wide_clip, tiny_model, device="cpu", frames="all", skip_start=100, **dict(SIZE, steps=1))
    assert inv.entry.frames == 13 and inv.entry.output_frames == 10 and abs(inv.entry.fps - 8.0) < 0.1
    assert engine.edit(inv, ["a cat"], device="cpu", output="frames").frames.shape[1] == 10
    half = torch.zeros(10, 96, 160)
    half[:, :, :80] = 1  # a mask per frame of the edit: its last frame's mask serves the repeats
    masked = engine.edit(inv, ["a cat"], device="cpu", output="latents", mask=half.numpy())
    assert masked.latents[..., 12:].equal(inv.latents()[:, :4, ..., 12:].to(masked.latents.dtype))  # 4 latent frames, less the anchor
    with pytest.raises(SettingsError, match="--frames takes a number or 'all'"):
        engine.invert(wide_clip, tiny_model, device="cpu", frames="most", **SIZE)


def test_a_clip_too_long_for_the_disk_is_refused_before_any_work(tiny_model, wide_clip, tmp_path, monkeypatch):
    import cache.atomic
    from cache.errors import DiskFullError
    from engine.models import components

    usage = type("U", (), {"total": 10**9, "used": 10**9 - 10**6, "free": 10**6})
    monkeypatch.setattr(cache.atomic.shutil, "disk_usage", lambda p: usage)
    components.LOAD_EVENTS.clear()
    with pytest.raises(DiskFullError, match=r"need \d+\.\d MiB .*976.6 KiB free"):
        engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path, **dict(LONG, steps=50))
    assert components.LOAD_EVENTS == [] and not any((tmp_path / "inversions").iterdir())


def test_the_web_app_tells_a_long_clips_windows_before_inverting(tiny_model, wide_clip, tmp_path):
    from webui.actions import Actions, app_config
    from webui.folders import Folders

    act = Actions(app_config(str(tiny_model), Folders.make(tmp_path / "cache", tmp_path / "uploads")))
    clip = act.folders.uploads / "clip.mp4"
    clip.write_bytes(wide_clip.read_bytes())
    assert act.on_every(str(clip), False) == ""
    assert act.on_every(str(clip), True) == "every frame at 8 fps: 42 frames in 10 overlapping windows, predicted 10x one window's time"


def test_the_command_line_takes_frames_all_and_refuses_other_words(wide_clip, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    result = CliRunner().invoke(cli, ["invert", str(wide_clip), "--model", str(tmp_path / "none"), "--frames", "most"])
    assert result.exit_code == 2 and "Invalid value for '--frames': 'most' is neither a number nor 'all'" in result.output
    result = CliRunner().invoke(cli, ["plan", "--frames", "97"])
    assert result.exit_code == 0 and "97 frames: 3 overlapping windows of 49 frames" in result.output


def _shards(inv) -> dict[str, dict[str, torch.Tensor]]:
    from cache.atomic import load_tensors

    root = inv.paths.attention_dir
    return {p.relative_to(root).as_posix().split("/", 1)[1]: load_tensors(p) for p in sorted(root.rglob("*.safetensors"))}


STORE = dict(attention_steps="0:0.5", inversion="fixed-point")  # the first of LONG's 2 edit steps; refinements run at t again


@pytest.mark.parametrize("where", ["disk", "cpu"])
def test_stored_attention_of_a_long_clip_replays_each_windows_own_reference(tiny_model, wide_clip, where):
    """Each window's K/V are captured from that window's forward in the inversion and replayed in
    that window's edit call: the same edit as the shared reference recomputed per window."""
    reporter = engine.Reporter()
    inv = engine.invert(wide_clip, tiny_model, device="cpu", attention_store=where, reporter=reporter, **STORE, **LONG)
    assert "2 blocks x 2 windows" in next(r for r in reporter.records if r.name == "plan").detail  # the budget counts every window
    recompute = engine.edit(inv, PROMPT, inject_steps="0:0.5", device="cpu", output="latents")
    stored = engine.edit(inv, PROMPT, inject_steps="0:0.5", reference="stored", device="cpu", output="latents")
    torch.testing.assert_close(stored.latents, recompute.latents, rtol=0, atol=1e-5)
    (described,) = (inv.manifest["attention"] if where == "disk" else inv.memory.described(2)).values()
    assert described["windows"] == 2  # `cache show` prints the manifest's store, windows included
    inv.release()


def test_a_long_clips_store_captured_later_from_the_cache_is_the_one_captured_while_inverting(tiny_model, wide_clip, tmp_path):
    during = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / "a", attention_store="disk", **STORE, **LONG)
    engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / "b", **STORE, **LONG)
    later = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=tmp_path / "b", attention_store="disk", **STORE, **LONG)
    a, b = _shards(during), _shards(later)
    assert list(a) == list(b) == [f"t_0999/{w}b_{i:02d}.safetensors" for w in ("", "w_01/") for i in (0, 1)]
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=0, atol=1e-6)


def test_k_prompts_on_the_lean_plan_replay_each_windows_store_as_one_prompt_does(tiny_model, wide_clip):
    """Row groups (the lean plan) over a long clip's replayed K/V, two prompts in one pass: the same
    rows as the staged plan, and the second row the same as that prompt alone with the shared reference."""
    inv = engine.invert(wide_clip, tiny_model, device="cpu", attention_store="cpu", **STORE, **LONG)
    prompts = ["a watercolor painting", "a charcoal sketch"]
    staged = engine.edit(inv, prompts, inject_steps="0:0.5", reference="stored", device="cpu", output="latents")
    lean = engine.edit(inv, prompts, inject_steps="0:0.5", reference="stored", plan="lean", device="cpu", output="latents")
    alone = engine.edit(inv, prompts[1:], inject_steps="0:0.5", device="cpu", output="latents")
    torch.testing.assert_close(lean.latents, staged.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(staged.latents[1:], alone.latents, rtol=0, atol=1e-5)
    inv.release()


def test_each_anchor_is_masked_by_its_own_frames_mask():
    """A local edit's mask on the stepped state: the clip's latent frames, then each anchor's frame alone."""
    from engine.stages.editing import _latent_grid
    from engine.video.masks import Mask, latent_mask

    pixels = torch.zeros(17, 96, 160)
    pixels[:, :, 80:] = 1
    pixels[8] = 1 - pixels[8]  # the anchor's frame (window (2, 5): latent frame 2 is frames 5-8) masked elsewhere
    grid = _latent_grid(Mask(pixels, "test"), window_spans(5, 3, 1), torch.Size((1, 6, 16, 12, 20)), 4)
    assert grid.shape == (6, 1, 12, 20)
    assert grid[:5].equal(latent_mask(Mask(pixels, "test"), 5, 12, 20))
    assert grid[5:].equal(latent_mask(Mask(pixels[8:9], "test"), 1, 12, 20)) and not grid[5:].equal(grid[:1])
