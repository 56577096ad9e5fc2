"""CogVideoX1.5-5B on a tiny checkpoint of its layout: time patched by 2, so its odd latent frame
counts are padded for the transformer; every path of the CLI; its defaults, plans and refusals."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

import engine
from engine.errors import ModelError
from engine.models.configs import PARAMS_15, TRANSFORMER_15
from engine.models.denoiser import predict, rotary_embeddings
from engine.models.model_info import builtin_15, check_supported, inspect_model
from engine.models.plans import PLANS, GiB, Workload, card_sizes, choose_plan, param_counts, predict_peaks, sequence_tokens
from tests.test_cli import _frames, invoke

STEPS = ["--steps", "2"]


@pytest.fixture(scope="module")
def transformer(tiny_15):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel.from_pretrained(tiny_15, subfolder="transformer").eval()


@torch.no_grad()
def test_odd_latent_frames_are_padded_in_front_with_the_first_frame(transformer):
    """9 frames are 3 latent frames: the unpadded call fails as upstream's script does (CogVideo
    #728), and `predict` runs [frame 0, frame 0, 1, 2] and drops the first prediction."""
    torch.manual_seed(0)
    rows, embeds, t = torch.randn(2, 3, 16, 12, 20), torch.randn(2, 226, 32), torch.tensor(500)
    with pytest.raises(RuntimeError):
        transformer(hidden_states=rows, encoder_hidden_states=embeds, timestep=t.expand(2), return_dict=False)
    out = predict(transformer, rows, embeds, t, rotary_embeddings(transformer, rows.shape, 8, "cpu"))
    assert out.shape == rows.shape
    padded = torch.cat([rows[:, :1], rows], dim=1)
    whole = transformer(
        hidden_states=padded, encoder_hidden_states=embeds, timestep=t.expand(2),
        image_rotary_emb=rotary_embeddings(transformer, padded.shape, 8, "cpu"), return_dict=False,
    )[0]
    torch.testing.assert_close(out, whole[:, 1:].float())
    even = torch.randn(1, 4, 16, 12, 20)  # 13 frames: nothing to pad
    assert predict(transformer, even, embeds[:1], t, rotary_embeddings(transformer, even.shape, 8, "cpu")).shape == even.shape


def test_rotary_tables_are_diffusers_15_pipelines(transformer):
    from types import SimpleNamespace

    from diffusers import CogVideoXPipeline

    pipe = SimpleNamespace(transformer=transformer, vae_scale_factor_spatial=8)
    for latent_frames in (3, 4):  # diffusers gets the padded count; ours the latents before padding
        ours = rotary_embeddings(transformer, (1, latent_frames, 16, 12, 20), 8, "cpu")
        theirs = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, 96, 160, 4, "cpu")
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_every_cli_path_keeps_the_frames_and_size(tiny_15, small_clip, tmp_path):
    """One inversion on the model's own size (no --frames/--height/--width: 9 frames of 96x160,
    3 latent frames, padded at every call), fixed-point, verified, with a disk attention store;
    run's edit (per-half), then `edit` with the stored reference, a window, layers, strength and a
    box mask over two prompts in row groups (lean), then `batch` on the cached inversion: every
    video has the inverted frames' count and size."""
    invert_flags = ["--steps", "2", "--inversion", "fixed-point", "--verify", "--attention-store", "disk"]
    printed = json.loads(invoke("run", small_clip, "--model", tiny_15, *invert_flags, "--prompt", "snow", "--reference", "per-half", "--out", tmp_path, "--json").stdout)
    inv = engine.open_inversion(printed["id"])
    assert (inv.entry.frames, inv.entry.frame_settings["height"], inv.entry.frame_settings["width"]) == (9, 96, 160)
    assert inv.verify is not None
    edited = json.loads(invoke(
        "edit", printed["id"], "--prompt", "a cat", "--prompt", "snow", "--reference", "stored", "--inject-steps", "0:0.5", "--inject-layers", "1",
        "--inject-strength", "0.5", "--mask-box", "0.1,0.1,0.6,0.6", "--plan", "lean", "--out", tmp_path, "--json",
    ).stdout)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f'[[job]]\nname = "one"\nvideo = "{small_clip}"\nprompts = ["a dog"]\n[job.invert]\nsteps = 2\ninversion = "fixed-point"\n')
    out = invoke("batch", jobs, "--model", tiny_15, "--out", tmp_path / "out", "--device", "cpu", "--json").output
    rows = json.loads(next(line for line in out.splitlines() if line.startswith("[{")))
    assert [r["status"] for r in rows] == ["cached", "done"], rows
    videos = [e["video"] for e in printed["edits"] + edited["edits"]] + [tmp_path / "out" / rows[1]["output"]]
    assert [_frames(v) for v in videos] == [(9, (96, 160, 3))] * 4


def test_defaults_follow_the_model(tiny_15, tmp_path):
    from engine.models.proxy import PROXY_DIR
    from engine.options import InvertOptions
    from engine.workflow import _invert_settings
    from webui.actions import app_config
    from webui.folders import Folders

    proxy = inspect_model(PROXY_DIR)
    frames, _ = _invert_settings(InvertOptions(), proxy)
    assert (frames.max_frames, frames.height, frames.width, proxy.defaults.fps) == (17, 96, 144, 25.0)
    given, _ = _invert_settings(InvertOptions(frames=49, height=480, width=720), proxy)
    assert (given.max_frames, given.height, given.width) == (49, 480, 720)  # what was given wins: its cache key is unchanged
    assert (builtin_15().defaults.frames, builtin_15().defaults.height, builtin_15().defaults.width, builtin_15().defaults.fps) == (81, 768, 1360, 16.0)
    fields = app_config(str(tiny_15), Folders.make(tmp_path / "cache", tmp_path / "uploads")).invert_defaults
    assert (fields["frames"], fields["height"], fields["width"]) == (9, 96, 160)


def test_a_size_far_from_the_models_is_a_warning(caplog):
    from engine.models.proxy import PROXY_DIR
    from engine.options import InvertOptions
    from engine.workflow import _invert_settings, _warn_size

    proxy = inspect_model(PROXY_DIR)
    with caplog.at_level(logging.WARNING, logger="cogedit"):
        _warn_size(proxy, _invert_settings(InvertOptions(height=112, width=160), proxy)[0])
        assert not caplog.records
        _warn_size(proxy, _invert_settings(InvertOptions(height=480, width=720), proxy)[0])
    assert "480x720 is 25x the pixels of" in caplog.text and "own 96x144" in caplog.text


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (dict(use_rotary_positional_embeddings=False), "looks like CogVideoX-2B"),
        (dict(in_channels=32), "is an image-to-video model"),  # CogVideoX-5b-I2V
        (dict(in_channels=32, ofs_embed_dim=512), "is an image-to-video model"),  # CogVideoX1.5-5B-I2V
    ],
)
def test_2b_and_image_to_video_are_refused_saying_why(change, expected):
    check_supported("m", TRANSFORMER_15)
    with pytest.raises(ModelError, match=expected):
        check_supported("m", {**TRANSFORMER_15, **change})


def test_plans_count_15s_tokens_and_fit_a_24gb_card():
    info = builtin_15()
    counted = param_counts(dataclasses.replace(info, known_params=None))  # on the meta device
    assert counted == PARAMS_15
    # 81 frames: 21 latent frames padded to 22, two to a token, of 48x85 patches; 161: 41 -> 42.
    assert sequence_tokens(info, 81, 768, 1360) == 226 + 11 * 48 * 85
    assert sequence_tokens(info, 161, 768, 1360) == 226 + 21 * 48 * 85
    w = Workload(81, 768, 1360)
    chosen = choose_plan(24 * GiB, info, w)
    assert max(predict_peaks(chosen, info, w).values()) <= 23.5 * GiB
    assert max(predict_peaks(PLANS["offload"], info, w).values()) <= 11.5 * GiB


def test_plan_command_knows_15_without_a_download(tiny_15):
    text = " ".join(invoke("plan", "--model", "THUDM/CogVideoX1.5-5b", "--frames", "161", "--vram", "24GB").stdout.split())
    assert "CogVideoX1.5-5B (built-in shape), 161 frames 768x1360" in text and text.endswith("lean")
    assert "9 frames 96x160" in " ".join(invoke("plan", "--model", tiny_15).stdout.split())  # a folder: its own size


def test_docs_plan_tables_are_the_predictions():
    """docs/cogvideox-1.5.md's tables: card_sizes and predict_peaks (what `cogedit plan` prints) for 81 and 161 frames."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "cogvideox-1.5.md").read_text()
    tables = [part.split("\n\n")[0] for part in doc.split("| plan | cards (--vram) |")[1:]]
    info = builtin_15()
    for frames, table in zip((81, 161), tables, strict=True):
        w = Workload(frames, 768, 1360)
        cards = card_sizes(info, w)
        for name, plan in PLANS.items():
            peaks = predict_peaks(plan, info, w)
            cells = [cards[name], *(f"{peaks[k] / GiB:.1f}" for k in ("encode", "embed", "invert", "edit", "decode")), f"{max(peaks.values()) / GiB:.1f}"]
            assert f"| `{name}` | " + " | ".join(cells) + " |" in table, f"{frames} frames, {name}: " + " | ".join(cells)
