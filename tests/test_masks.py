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
from engine.video import shapes
from engine.video.masks import FIT_MARGIN, Boxes, Mask, box_mask, fit_to_object, latent_mask, load_mask, mask_spec, parse_box, pasted
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


def test_boxes_move_from_the_first_frames_box_to_the_last_frames():
    # 5 frames of 16x16: the box slides from the top-left quarter to the bottom-right one, 2 px a frame
    mask = load_mask(mask_spec(None, "0,0,0.5,0.5", "0.5,0.5,1,1"), FrameSettings(max_frames=5, height=16, width=16), 131, 5)
    for f in range(5):
        want = torch.zeros(16, 16)
        want[2 * f : 2 * f + 8, 2 * f : 2 * f + 8] = 1
        assert torch.equal(mask.pixels[f], want), f
    assert mask.label == "box 0,0,0.5,0.5 to 0.5,0.5,1,1"
    # a clip padded to 4k+1 (3 shown frames of 5): the box reaches the end box on the last shown frame, the repeats keep it
    padded = box_mask(Boxes((0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)), 5, 16, 16, shown=3).pixels
    assert torch.equal(padded[1], mask.pixels[2]) and all(torch.equal(padded[f], mask.pixels[4]) for f in (2, 3, 4))


@pytest.mark.parametrize(
    ("box", "end", "fit", "expected"),
    [
        (None, "0,0,0.5,0.5", "none", "--mask-box-end is the box on the last frame: give the first frame's box with --mask-box too"),
        ("0,0,0.5,0.5", "0,0,0.5", "none", "--mask-box-end takes four fractions"),
        ("0,0,0.5,0.5", "0.6,0,0.5,0.5", "none", "--mask-box-end '0.6,0,0.5,0.5' is empty"),
        ("0,0,0.5,0.5", None, "tight", "--mask-fit 'tight': choose none or object"),
        (None, None, "object", "--mask-fit object shrinks a mask to the object inside it: give --mask-box (or --mask) too"),
        (None, None, "paste", "--mask-paste puts the edit into the source through the mask: give --mask-box (or --mask) too"),
    ],
)
def test_bad_moving_boxes_and_fits_are_refused(box, end, fit, expected):
    with pytest.raises(engine.SettingsError) as err:
        mask_spec(None, box, end, "none", paste=True) if fit == "paste" else mask_spec(None, box, end, fit)
    assert str(err.value).startswith(expected)


def test_fit_to_object_keeps_the_object_and_drops_the_rest_of_the_box():
    """A box around a shapes clip's whole path, fit to the object: on every frame the object and at
    most FIT_MARGIN px around it; a box whose edge cuts through the object keeps it too."""
    frames, masks = shapes.render(shapes.clip_spec(3, "heldout", objects=1))
    thing = torch.from_numpy(masks[0])
    ys, xs = np.nonzero(masks[0].any(0))
    h, w = thing.shape[1:]
    path = ((xs.min() - 4) / w, (ys.min() - 4) / h, (xs.max() + 5) / w, (ys.max() + 5) / h)
    fitted = fit_to_object(box_mask(path, len(frames), h, w), torch.from_numpy(frames)).pixels > 0
    grown = torch.nn.functional.max_pool2d(thing.float()[:, None], 2 * FIT_MARGIN + 1, 1, FIT_MARGIN)[:, 0] > 0
    assert torch.equal(fitted, grown)  # the object grown by FIT_MARGIN px, exactly (the box reaches 4 px beyond it)
    assert fitted.sum() < 0.5 * box_mask(path, len(frames), h, w).pixels.sum()  # far less than the box
    # the object's first-frame box cut through its middle: the object's color on the edge is not taken for the surroundings
    y_mid = (ys.min() + ys.max()) / 2 / h
    cut = fit_to_object(box_mask((path[0], path[1], path[2], y_mid), 1, h, w), torch.from_numpy(frames[:1])).pixels[0] > 0
    inside = box_mask((path[0], path[1], path[2], y_mid), 1, h, w).pixels[0] > 0
    assert (cut >= thing[0] & inside).all() and cut.sum() < 0.6 * inside.sum()
    assert (cut <= inside).all()  # grown for the rim, but never past the box


def test_fit_to_object_refuses_a_box_with_nothing_in_it():
    frames = torch.full((3, 16, 16, 3), 120, dtype=torch.uint8)
    with pytest.raises(engine.SettingsError) as err:
        fit_to_object(box_mask((0.25, 0.25, 0.75, 0.75), 3, 16, 16), frames)
    assert str(err.value).startswith("--mask-fit object found nothing inside the mask (box 0.25,0.25,0.75,0.75) that stands apart from its edge")


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


def test_a_mask_of_the_edits_frames_ignores_the_sources_skips_and_stride(tmp_path):
    """A mask video with one frame per edited frame is read whole, frame for frame: the source's
    --skip-start/--skip-end/--stride picked the edit's frames and must not pick among the mask's."""
    from engine.stages.decode import write_video

    ramp = np.stack([np.full((48, 80, 3), 20 * i + 40, np.uint8) for i in range(9)])  # frame i: gray level 20i + 40
    write_video(ramp, tmp_path / "ramp.mp4", fps=8.0)
    plain = load_mask(tmp_path / "ramp.mp4", FRAMES, 131, 9).pixels
    picky = FrameSettings(9, skip_start=3, skip_end=5, stride=2, height=96, width=160)
    assert torch.equal(load_mask(tmp_path / "ramp.mp4", picky, 131, 9).pixels, plain)
    levels = plain.mean((1, 2))
    assert torch.allclose(levels, (20 * torch.arange(9) + 40) / 255, atol=0.03)  # in order, gray levels / 255


def test_a_gray_mask_is_its_gray_level_over_255(tmp_path):
    Image.fromarray(np.full((48, 80), 128, np.uint8)).save(tmp_path / "half.png")
    Image.fromarray(np.full((48, 80), 255, np.uint8)).save(tmp_path / "white.png")
    half = load_mask(tmp_path / "half.png", FRAMES, 131, 9)
    assert torch.allclose(half.pixels, torch.full((9, 96, 160), 128 / 255), atol=1e-6) and half.label == "file half.png"
    assert torch.equal(load_mask(tmp_path / "white.png", FRAMES, 131, 9).pixels, torch.ones(9, 96, 160))


def test_a_mask_image_of_another_shape_meets_the_frame_as_the_source_did(tmp_path):
    wide = np.zeros((30, 120), np.uint8)
    wide[:, 60:] = 255  # right half white, in a 4:1 image
    Image.fromarray(wide).save(tmp_path / "wide.png")
    for fit in ("stretch", "crop", "pad"):
        pixels = load_mask(tmp_path / "wide.png", FrameSettings(9, height=96, width=160, fit=fit), 131, 9).pixels
        assert pixels.shape == (9, 96, 160)
        assert pixels[:, 48, 84:].min() > 0.9 and pixels[:, 48, :76].max() < 0.1, fit  # the right half, left and right of the middle
    assert load_mask(tmp_path / "wide.png", FrameSettings(9, height=96, width=160, fit="pad"), 131, 9).pixels[:, :10].max() == 0  # bars above


def test_array_mask_errors_name_the_edits_shape_exactly():
    tall = FrameSettings(9, height=96, width=160)
    with pytest.raises(engine.SettingsError) as err:
        load_mask(np.ones((96, 96)), tall, 131, 9)
    assert str(err.value) == "mask array is shaped [9, 96, 96]; give [96, 160] or [9, 96, 160] (the edit's frames, height, width)"
    with pytest.raises(engine.SettingsError) as err:
        load_mask(np.ones((4, 96, 160)), tall, 131, 9)  # right size, wrong frame count
    assert "shaped [4, 96, 160]" in str(err.value)
    with pytest.raises(engine.SettingsError) as err:
        load_mask(np.full((96, 160), -0.5), tall, 131, 9)
    assert str(err.value) == "mask array values must lie in 0-1 (1 = may change)"
    with pytest.raises(engine.SettingsError) as err:
        load_mask(np.full((96, 160), 0.49), tall, 131, 9)
    assert str(err.value) == "the mask (array) is black everywhere: nothing could change; paint white where the edit may change"
    mask = load_mask(np.full((96, 160), 0.5, np.float64), tall, 131, 9)  # exactly half passes the black check
    assert mask.label == "array" and mask.pixels.dtype == torch.float32
    with pytest.raises(engine.SettingsError) as err:
        mask_spec("a.png", "0,0,1,1")
    assert str(err.value) == "give --mask or --mask-box, not both"


def test_a_mask_per_shown_frame_is_padded_with_its_last_frame(tmp_path):
    """A clip padded to 4k+1 by repeating its last frame (6 shown, 9 edited) takes a mask of its 6
    shown frames, the last one repeated for the padding, as an array or as a video."""
    from engine.stages.decode import write_video

    arr = np.zeros((6, 96, 160), np.float32)
    for i in range(6):
        arr[i, :, 20 * i : 20 * i + 40] = 1  # a band that moves right
    pixels = load_mask(arr, FRAMES, 131, 9, shown=6).pixels
    assert pixels.shape == (9, 96, 160) and torch.equal(pixels[:6], torch.from_numpy(arr))
    assert all(torch.equal(pixels[i], pixels[5]) for i in range(6, 9))
    with pytest.raises(engine.SettingsError, match="shaped \\[6, 96, 160\\]"):
        load_mask(arr, FRAMES, 131, 9)  # 6 frames are not the edit's 9 when none is padded
    write_video(np.stack([np.full((48, 80, 3), 40 * i + 40, np.uint8) for i in range(6)]), tmp_path / "six.mp4", fps=8.0)
    video = load_mask(tmp_path / "six.mp4", FRAMES, 131, 9, shown=6).pixels
    assert video.shape == (9, 96, 160) and torch.allclose(video.mean((1, 2)), torch.tensor([40 * min(i, 5) + 40 for i in range(9)]) / 255, atol=0.03)


def test_the_soft_edge_continues_the_mask_past_the_frames_border():
    """The blur pads by repeating the border cells: a strip along the left edge gets the same
    ramp beside it from top to bottom (zero padding would fade it at the corners)."""
    pixels = torch.zeros(1, 96, 160)
    pixels[:, :, :8] = 1  # the left latent column (cells of 8 pixels)
    grid = latent_mask(Mask(pixels, "strip"), 1, 12, 20)[0, 0]
    assert torch.all(grid[:, 0] == 1) and torch.allclose(grid[:, 1], torch.full((12,), 0.25)) and torch.all(grid[:, 2:] == 0)


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


def test_a_moving_box_and_a_fit_box_reach_the_edit_as_their_masks(inversion):
    """engine.edit's mask_box + mask_box_end is the interpolated mask, mask_fit="object" the box fit to
    the inversion's own frames: each the same edit as its mask given as an array."""
    prompt = ["a watercolor painting of a forest"]

    def edit(**options):
        return engine.edit(inversion, prompt, device="cpu", output="latents", **options).latents[0]

    moving = box_mask(Boxes((0, 0, 0.5, 1), (0.5, 0, 1, 1)), 9, 96, 160).pixels.numpy()
    assert torch.equal(edit(mask_box="0,0,0.5,1", mask_box_end="0.5,0,1,1"), edit(mask=moving))
    box = box_mask((0.1, 0.1, 0.9, 0.9), 9, 96, 160)
    fitted = fit_to_object(box, inversion.frames()).pixels
    assert not torch.equal(fitted, box.pixels)  # the fit drops part of the box (so an edit that ignored it would differ)
    assert torch.equal(edit(mask_box="0.1,0.1,0.9,0.9", mask_fit="object"), edit(mask=fitted.numpy()))


def test_pasted_takes_each_frame_through_its_own_mask_with_a_one_pixel_soft_edge():
    """Frame f: the edit inside mask f, the source outside it, a 3x3 box blur across the join."""
    source, edited = np.zeros((3, 8, 8, 3), np.uint8), np.full((3, 8, 8, 3), 90, np.uint8)
    pixels = torch.zeros(4, 8, 8)  # one more mask frame than the edit: the padded frames' mask
    for f in range(4):
        pixels[f, 2:6, f : f + 3] = 1  # a box moving right
    out = pasted(edited, source, Mask(pixels, "moving"))
    assert out.shape == edited.shape and out.dtype == np.uint8
    for f in range(3):
        assert (out[f, 3:5, f + 1] == 90).all()  # well inside: the edit
        assert (out[f, :, f + 4 :] == 0).all() and (out[f, 7] == 0).all()  # two pixels off: the source
        assert out[f, 3, f + 3, 0] == 30  # just outside the box: three of the nine neighbours are inside


def test_a_pasted_edit_is_the_source_outside_the_mask_and_the_edit_inside(inversion):
    """--mask-paste: the decoded frames outside the box (and its one-pixel soft edge) are the
    source's exactly; inside, the unpasted edit's; and the paste has a name of its own."""
    prompt = ["a watercolor painting of a forest"]

    def frames(**options):
        return engine.edit(inversion, prompt, device="cpu", output="frames", mask_box="0,0,0.5,1", **options).frames[0]

    plain, paste = frames(), frames(mask_paste=True)
    source = inversion.frames().numpy()[: len(paste)]
    assert (paste[:, :, 81:] == source[:, :, 81:]).all()  # the box ends at column 80
    assert (paste[:, :, :79] == plain[:, :, :79]).all()
    assert not (plain[:, :, 81:] == source[:, :, 81:]).all()  # without it the decoder's round trip shows there
    runtime = Runtime.default("cpu")
    assert edit_stem(inversion.id, EditSettings(prompt, mask="a" * 16), runtime) != edit_stem(inversion.id, EditSettings(prompt, mask="a" * 16, paste=True), runtime)


def test_mask_names_the_outputs_and_bad_masks_are_one_line_errors(inversion, tmp_path):
    runner = CliRunner()
    base = ["edit", inversion.id[:8], "--prompt", "a forest", "--device", "cpu", "--cache-dir", str(inversion.layout.root), "--out", str(tmp_path)]
    local = runner.invoke(cli, [*base, "--mask-box", "0,0,0.5,1"])
    assert local.exit_code == 0, local.output
    plain = edit_stem(inversion.id, EditSettings(("a forest",)), Runtime.default("cpu"))
    assert inversion.id[:8] in local.output and plain not in local.output  # the mask is in the name
    # a moving box reaches the edit: another mask, another name
    moving = runner.invoke(cli, [*base, "--mask-box", "0,0,0.5,1", "--mask-box-end", "0.5,0,1,1"])
    assert moving.exit_code == 0, moving.output
    videos = [[line for line in r.output.splitlines() if line.endswith(".mp4")] for r in (local, moving)]
    assert videos[0] and videos[1] and not set(videos[0]) & set(videos[1])
    for args, expected in [
        (["--mask", str(tmp_path / "missing.png")], "does not exist"),
        (["--mask-box", "0,0,1.2,1"], "outside the frame"),
        (["--mask-box", "0.5,0,0.5,1"], "is empty"),
        (["--mask-box", "0,0,1,1", "--mask", str(tmp_path / "missing.png")], "not both"),
        (["--mask", str(CLIPS / "bunny_small.mp4")], "has 47 frames"),
        (["--mask-box-end", "0,0,0.5,1"], "--mask-box-end is the box on the last frame: give the first frame's box with --mask-box too"),
        (["--mask-box", "0,0,0.5,1", "--mask-box-end", "0,0,1.5,1"], "--mask-box-end '0,0,1.5,1' reaches outside the frame"),
        (["--mask-fit", "object"], "--mask-fit object shrinks a mask to the object inside it: give --mask-box (or --mask) too"),
        (["--mask-paste"], "--mask-paste puts the edit into the source through the mask: give --mask-box (or --mask) too"),
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

