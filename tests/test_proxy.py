"""The trained proxies have learned something, and `cogedit tiny-model` writes them (or a random one)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli import cli
from engine.models.model_info import inspect_model
from engine.models.proxy import PROXY_DIR, PROXY_FRAMES, PROXY_HEIGHT, PROXY_WIDTH, SHAPES_DIR
from engine.stages.vloss import heldout_loss
from engine.video import shapes
from engine.video.clips import HELD_OUT
from engine.video.reader import FrameSettings, read_frames, to_model_input


def test_proxy_beats_random_weights_on_the_held_out_clip(tiny_model):
    # The clip's last frames, which no training window contained, at the proxy's size.
    settings = FrameSettings(max_frames=PROXY_FRAMES, height=PROXY_HEIGHT, width=PROXY_WIDTH)
    frames = to_model_input(read_frames(HELD_OUT.path, settings)[0])
    caption = HELD_OUT.captions[0]
    proxy, random = heldout_loss(PROXY_DIR, frames, caption, draws=4), heldout_loss(tiny_model, frames, caption, draws=4)
    assert proxy <= random / 3, (proxy, random)


def test_shapes_proxy_beats_random_weights_on_a_held_out_pair(tiny_model):
    spec = shapes.clip_spec(0, "heldout")  # a pair of color and shape no training clip had
    frames = to_model_input(torch.from_numpy(shapes.render(spec)[0]))
    proxy, random = heldout_loss(SHAPES_DIR, frames, spec.caption, draws=4), heldout_loss(tiny_model, frames, spec.caption, draws=4)
    assert proxy <= random / 3, (proxy, random)


@pytest.mark.parametrize("folder", [PROXY_DIR, SHAPES_DIR])
def test_proxy_is_small_and_says_how_it_was_trained(folder):
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 16 * 2**20
    facts = json.loads((folder / "TRAINING.json").read_text())
    # Issue 18: trained in at most 10 minutes on one H200, shipped in at most 16 MB.
    assert facts["training_minutes"] <= 10 and facts["params_total"] > 0 and facts["device"]


@pytest.mark.parametrize("flags", [[], ["--random"], ["--world", "shapes"]])
def test_tiny_model_writes_a_loadable_folder(tmp_path, flags):
    out = tmp_path / "model"
    result = CliRunner().invoke(cli, ["tiny-model", str(out), *flags], catch_exceptions=False)
    assert result.exit_code == 0 and result.stdout.strip() == str(out)  # the path alone on stdout, for scripts
    # what it wrote and how to use it, on stderr
    assert f"to {out.resolve()}" in result.stderr and f"use it: cogedit ui --model {out.resolve()}" in result.stderr
    assert ('"a red circle moving left' in result.stderr) == (flags == ["--world", "shapes"])
    info = inspect_model(out)
    assert (out / "TRAINING.json").exists() != (flags == ["--random"])
    assert info.transformer_config["use_rotary_positional_embeddings"]
    if flags == ["--world", "shapes"]:
        assert json.loads((out / "TRAINING.json").read_text())["what"].startswith("cogedit's shapes proxy")


def test_random_weights_belong_to_no_world(tmp_path):
    result = CliRunner().invoke(cli, ["tiny-model", str(tmp_path / "m"), "--random", "--world", "shapes"])
    assert result.exit_code == 1 and "drop --random or --world" in result.output
