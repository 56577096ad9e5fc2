"""The trained proxy has learned something, and `cogedit tiny-model` writes it (or a random one)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli import cli
from engine.models.model_info import inspect_model
from engine.models.proxy import PROXY_DIR, PROXY_FRAMES, PROXY_HEIGHT, PROXY_WIDTH
from engine.stages.vloss import heldout_loss
from engine.video.clips import HELD_OUT
from engine.video.reader import FrameSettings, read_frames, to_model_input


def test_proxy_beats_random_weights_on_the_held_out_clip(tiny_model):
    # The clip's last frames, which no training window contained, at the proxy's size.
    settings = FrameSettings(max_frames=PROXY_FRAMES, height=PROXY_HEIGHT, width=PROXY_WIDTH)
    frames = to_model_input(read_frames(HELD_OUT.path, settings)[0])
    caption = HELD_OUT.captions[0]
    proxy, random = heldout_loss(PROXY_DIR, frames, caption, draws=4), heldout_loss(tiny_model, frames, caption, draws=4)
    assert proxy <= random / 3, (proxy, random)


def test_proxy_is_small_and_says_how_it_was_trained():
    size = sum(f.stat().st_size for f in PROXY_DIR.rglob("*") if f.is_file())
    assert size <= 16 * 2**20
    facts = json.loads((PROXY_DIR / "TRAINING.json").read_text())
    assert facts["training_minutes"] <= 8 and facts["params_total"] > 0 and facts["device"]


@pytest.mark.parametrize("flags", [[], ["--random"]])
def test_tiny_model_writes_a_loadable_folder(tmp_path, flags):
    out = tmp_path / "model"
    result = CliRunner().invoke(cli, ["tiny-model", str(out), *flags], catch_exceptions=False)
    assert result.exit_code == 0 and result.stdout.strip() == str(out)
    info = inspect_model(out)
    assert (out / "TRAINING.json").exists() != bool(flags)
    assert info.transformer_config["use_rotary_positional_embeddings"]
