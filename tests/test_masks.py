"""Local edits: masks from files, boxes and arrays on the latent grid, the edit that keeps the
source outside them, and one-line errors for bad masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import engine
from cli import cli
from engine.models.components import Runtime
from engine.stages.settings import EditSettings
from engine.video.masks import Mask, box_mask, latent_mask, load_mask, parse_box
from engine.video.reader import FrameSettings
from engine.workflow import edit_stem
from tests.conftest import CLIPS, SMALL

FRAMES = FrameSettings(max_frames=9, height=96, width=160)


@pytest.fixture(scope="module")
def inversion(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    return engine.invert(CLIPS / "bunny_wide.mp4", tiny_model, device="cpu", cache_dir=root, source_prompt="a rabbit", **SMALL)


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ("0.1,0.2,0.5", "four fractions"),
        ("a,b,c,d", "four fractions"),
        ("0.1,0.2,1.5,0.9", "outside the frame"),
        ("-0.1,0.2,0.5,0.9", "outside the frame"),
        ("0.5,0.2,0.5,0.9", "is empty"),
        ("0.1,0.9,0.5,0.2", "is empty"),
        ("0.1,0.5,0.5,0.5", "is empty"),
    ],
)
def test_bad_boxes_are_refused(box, expected):
    with pytest.raises(engine.SettingsError, match=expected):
        parse_box(box)


def test_box_covers_its_fraction_of_the_frame():
    mask = box_mask(parse_box("0.25,0.5,0.75,1"), 9, 96, 160).pixels
    assert mask.shape == (9, 96, 160)
    assert mask[:, 48:, 40:120].all() and mask.sum() == 9 * 48 * 80


def test_a_pixel_whose_center_lies_on_the_boxs_edge_is_inside():
    # centers at 1/8, 3/8, 5/8, 7/8 of the side: exact in binary, so the edges hit them exactly
    mask = box_mask((0.125, 0.375, 0.625, 0.875), 1, 4, 4)
    assert mask.pixels[0].tolist() == [[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]] and mask.label == "box 0.125,0.375,0.625,0.875"


def test_latent_mask_takes_the_union_of_each_latent_frames_frames_and_a_soft_edge():
    pixels = torch.zeros(9, 96, 160)
    pixels[3, 32:64, 48:96] = 1.0  # one frame only: latent frame 1 encodes frames 1-4
    grid = latent_mask(Mask(pixels, "test"), 3, 12, 20)
    assert grid.shape == (3, 1, 12, 20)
    assert grid[0].max() == 0 and grid[2].max() == 0
    assert (grid[1, 0, 4:8, 6:12] == 1).all()  # inside stays 1
    ring = grid[1, 0, 3, 6:12]  # one cell outside: soft, not 0 or 1
    assert ((ring > 0) & (ring < 1)).all()
    assert grid[1, 0, :2].max() == 0 and grid[1, 0, :, :5].max() == 0  # two cells out: untouched


def test_each_pixel_frame_lands_in_its_own_latent_frame():
    """The causal VAE encodes frame 0 alone, then frames 4k-3..4k in latent frame k: a mask one
    frame off edits a latent frame the user did not mark."""
    for j in range(9):
        pixels = torch.zeros(9, 8, 8)
        pixels[j] = 1.0
        grid = latent_mask(Mask(pixels, "test"), 3, 2, 2)
        assert [int(grid[k].max() > 0) for k in range(3)] == [int(k == (j + 3) // 4) for k in range(3)], j
    with pytest.raises(engine.SettingsError) as err:
        latent_mask(Mask(torch.zeros(8, 8, 8), "test"), 3, 2, 2)
    assert str(err.value) == "the mask has 8 frames, the edit 9"


def test_image_mask_and_its_errors(tmp_path):
    image = np.zeros((48, 80), np.uint8)
    image[:, 40:] = 255
    Image.fromarray(image).save(tmp_path / "right.png")
    mask = load_mask(tmp_path / "right.png", FRAMES, 131, 9)
    assert mask.pixels.shape == (9, 96, 160)
    assert mask.pixels[:, :, 84:].min() > 0.99 and mask.pixels[:, :, :76].max() < 0.01
    with pytest.raises(engine.SettingsError, match="does not exist"):
        load_mask(tmp_path / "nope.png", FRAMES, 131, 9)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(engine.SettingsError, match="not a readable image"):
        load_mask(tmp_path / "text.png", FRAMES, 131, 9)
    Image.fromarray(np.zeros((48, 80), np.uint8)).save(tmp_path / "black.png")
    with pytest.raises(engine.SettingsError, match="black everywhere"):
        load_mask(tmp_path / "black.png", FRAMES, 131, 9)


def test_video_mask_needs_one_frame_per_source_or_edited_frame():
    # bunny_small.mp4 has 47 frames: neither the source's 131 nor the edit's 9
    with pytest.raises(engine.SettingsError, match="has 47 frames; give one mask per frame of the source video \\(131\\) or of the edit \\(9\\)"):
        load_mask(CLIPS / "bunny_small.mp4", FRAMES, 131, 9)
    # ... and as a mask of a 47-frame source it goes through the same frame selection
    assert load_mask(CLIPS / "bunny_small.mp4", FRAMES, 47, 9).pixels.shape == (9, 96, 160)


def test_array_masks_are_checked():
    with pytest.raises(engine.SettingsError, match="shaped \\[5, 96, 160\\]"):
        load_mask(np.ones((5, 96, 160)), FRAMES, 131, 9)
    with pytest.raises(engine.SettingsError, match="values must lie in 0-1"):
        load_mask(np.full((96, 160), 2.0), FRAMES, 131, 9)
    assert load_mask(np.ones((96, 160), bool), FRAMES, 131, 9).pixels.shape == (9, 96, 160)


def test_a_masked_edit_keeps_the_source_outside_and_changes_inside(inversion):
    clean = inversion.entry.load(inversion.entry.paths.latents, "latents")[0]
    prompt = ["a watercolor painting of a forest"]
    local = engine.edit(inversion, prompt, device="cpu", output="latents", mask_box="0,0,0.5,1").latents[0]
    # left half of the 20 latent columns may change, the soft edge reaches column 10, the rest is the source exactly
    assert torch.equal(local[..., 11:], clean[..., 11:])
    assert not torch.equal(local[..., :10], clean[..., :10])
    # a box and the same mask as an array are one edit; the mask changes the output name
    pixels = box_mask(parse_box("0,0,0.5,1"), 9, 96, 160).pixels.numpy()
    same = engine.edit(inversion, prompt, device="cpu", output="latents", mask=pixels).latents[0]
    assert torch.equal(same, local)


def test_mask_names_the_outputs_and_bad_masks_are_one_line_errors(inversion, tmp_path):
    runner = CliRunner()
    base = ["edit", inversion.id[:8], "--prompt", "a forest", "--device", "cpu", "--cache-dir", str(inversion.layout.root), "--out", str(tmp_path)]
    local = runner.invoke(cli, [*base, "--mask-box", "0,0,0.5,1"])
    assert local.exit_code == 0, local.output
    plain = edit_stem(inversion.id, EditSettings(("a forest",)), Runtime.default("cpu"))
    assert inversion.id[:8] in local.output and plain not in local.output  # the mask is in the name
    for args, expected in [
        (["--mask", str(tmp_path / "missing.png")], "does not exist"),
        (["--mask-box", "0,0,1.2,1"], "outside the frame"),
        (["--mask-box", "0.5,0,0.5,1"], "is empty"),
        (["--mask-box", "0,0,1,1", "--mask", str(tmp_path / "missing.png")], "not both"),
        (["--mask", str(CLIPS / "bunny_small.mp4")], "has 47 frames"),
    ]:
        result = runner.invoke(cli, [*base, *args])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.output


@pytest.mark.parametrize(("options", "expected"), [({"mask_box": "0,0,1.2,1"}, "outside the frame"), ({"mask": "missing.png"}, "does not exist")])
def test_run_refuses_a_bad_mask_before_it_inverts(tiny_model, tmp_path, options, expected):
    with pytest.raises(engine.SettingsError, match=expected):
        engine.run(CLIPS / "bunny_wide.mp4", tiny_model, "a forest", device="cpu", cache_dir=tmp_path, **SMALL, **options)
    assert not list(tmp_path.rglob("*.safetensors"))  # nothing was inverted

