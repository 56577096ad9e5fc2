"""The shapes world (engine/video/shapes.py) and the exact edit measures on it
(benchmarks/shape_measures.py): the truth is exact, and every measure can fail."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from benchmarks.shape_measures import EditTruth, classify_shape, dilate, edit_measures, painted_region, psnr_outside, sample_adherence
from engine.video import shapes

GRAMMAR = re.compile(
    r"a (red|green|blue|yellow|white) (circle|square|triangle) moving (left|right|up|down)"
    r"( and a (red|green|blue|yellow|white) (circle|square|triangle) moving (left|right|up|down))?"
    r" on a (gray|sand|grass|sky) background"
)


def one_object(split: str, count: int) -> list[shapes.ClipSpec]:
    return [shapes.clip_spec(seed, split) for seed in shapes.one_object_seeds(count, split)]


def test_clips_are_seeded_and_follow_the_grammar():
    a, b = shapes.render(shapes.clip_spec(3)), shapes.render(shapes.clip_spec(3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], shapes.render(shapes.clip_spec(4))[0])
    specs = [shapes.clip_spec(seed, split) for split in shapes.SPLITS for seed in range(300)]
    assert all(GRAMMAR.fullmatch(s.caption) for s in specs)
    assert {len(s.things) for s in specs} == {1, 2}
    assert {t.direction for s in specs for t in s.things} == set(shapes.DIRECTIONS)
    assert {t.speed for s in specs for t in s.things} == {1, 2, 3}


def test_held_out_pairs_never_train_and_always_lead_held_out_clips():
    train = {(t.color, t.shape) for seed in range(2000) for t in shapes.clip_spec(seed, "train").things}
    assert train.isdisjoint(shapes.HELD_OUT) and len(train) == 15 - len(shapes.HELD_OUT)
    held = [shapes.clip_spec(seed, "heldout") for seed in range(100)]
    assert all((s.things[0].color, s.things[0].shape) in shapes.HELD_OUT for s in held)
    assert {(s.things[0].color, s.things[0].shape) for s in held} == set(shapes.HELD_OUT)


def test_masks_are_exact_and_objects_move_as_captioned():
    for spec in one_object("train", 30):
        frames, masks = shapes.render(spec)
        thing = spec.things[0]
        mask = masks[0]
        assert (frames[mask] == shapes.COLORS[thing.color]).all()
        # the whole path stays in the frame: every frame shows the whole shape
        area = mask.sum((1, 2))
        assert abs(area.mean() - shapes.shape_area(thing.shape, thing.size)) < 0.1 * area.mean()
        assert area.min() > 0.9 * area.max()
        ys, xs = np.nonzero(mask[-1])
        y0, x0 = np.nonzero(mask[0])
        dx, dy = shapes.DIRECTIONS[thing.direction]
        moved = np.array([xs.mean() - x0.mean(), ys.mean() - y0.mean()])
        assert np.allclose(moved, np.array([dx, dy]) * thing.speed * (shapes.FRAMES - 1), atol=1.0)


def test_a_later_object_hides_an_earlier_one():
    for seed in range(2000):
        spec = shapes.clip_spec(seed, objects=2)
        first, second = (shapes.shape_mask(t.shape, t.centroids(), t.size) for t in spec.things)
        if (first & second).any():
            break
    frames, masks = shapes.render(spec)
    assert np.array_equal(masks[0], first & ~second) and np.array_equal(masks[1], second)
    assert (frames[second] == shapes.COLORS[spec.things[1].color]).all()


# ---------------------------------------------------------------- measures


@pytest.fixture(scope="module")
def source() -> shapes.ClipSpec:
    return next(s for s in one_object("heldout", 20) if s.things[0].shape == "circle" and s.background == "gray")


def test_classify_shape_names_each_shape():
    for shape in shapes.SHAPES:
        mask = shapes.shape_mask(shape, np.array([[70.0, 50.0]]), 13.0)[0]
        assert classify_shape(mask)[0] == shape
    assert classify_shape(np.zeros((96, 144), bool))[0] is None


@pytest.mark.parametrize(
    ("change", "wrong", "measure", "on_target", "below"),
    [
        ({"color": "red"}, {"color": "green"}, "color_share", 0.99, 0.01),
        ({"shape": "triangle"}, {"shape": "square"}, "shape_iou", 0.95, 0.6),
        ({"background": "sky"}, {"background": "sand"}, "background_share", 0.99, 0.01),
    ],
)
def test_adherence_passes_the_target_and_fails_the_source_and_a_wrong_edit(source, change, wrong, measure, on_target, below):
    target = shapes.with_change(source, **change)
    truth = EditTruth(source, target, shapes.render(source)[1])
    assert truth.kind == next(iter(change))
    assert edit_measures(shapes.render(target)[0], truth)[measure] > on_target
    assert edit_measures(shapes.render(source)[0], truth)[measure] < below  # unedited
    assert edit_measures(shapes.render(shapes.with_change(source, **wrong))[0], truth)[measure] < below  # edited, but not as asked


def test_a_color_edit_that_kept_the_source_color_is_named_so(source):
    # what the proxy's color edits did on the H200 (SHAPES.md): color_share 0 because the object kept its color
    truth = EditTruth(source, shapes.with_change(source, color="red"), shapes.render(source)[1])
    kept = edit_measures(shapes.render(source)[0], truth)
    assert kept["source_color_share"] > 0.99 and kept["color_share"] < 0.01
    done = edit_measures(shapes.render(truth.target)[0], truth)
    assert done["source_color_share"] < 0.01 and done["color_share"] > 0.99


def test_background_color_is_measured(source):
    truth = EditTruth(source, shapes.with_change(source, background="sky"), shapes.render(source)[1])
    rgb = edit_measures(shapes.render(truth.target)[0], truth)["background_rgb"]
    assert np.allclose(rgb, shapes.BACKGROUNDS["sky"], atol=3)
    assert not np.allclose(edit_measures(shapes.render(source)[0], truth)["background_rgb"], shapes.BACKGROUNDS["sky"], atol=30)


def test_structure_measures_catch_a_moved_or_shrunk_object(source):
    frames, masks = shapes.render(source)
    truth = EditTruth(source, source, masks)
    kept = edit_measures(frames, truth)
    assert kept["centroid_error_px"] < 0.5 and abs(kept["size_ratio"] - 1) < 0.01
    thing = source.things[0]
    moved = dataclasses.replace(source, things=(dataclasses.replace(thing, x=thing.x + 5, y=thing.y + 2),))
    assert 4 < edit_measures(shapes.render(moved)[0], truth)["centroid_error_px"] < 6
    small = dataclasses.replace(source, things=(dataclasses.replace(thing, size=thing.size * 0.7),))
    assert edit_measures(shapes.render(small)[0], truth)["size_ratio"] < 0.6


def test_painted_region_catches_a_painted_trail_and_a_moved_patch(source):
    """A color edit that recolors the object scores its area and place; one that paints a box
    around the whole path, or the object moved, or nothing, scores badly."""
    target = shapes.with_change(source, color="red")
    masks = shapes.render(source)[1]
    truth = EditTruth(source, target, masks)
    done = painted_region(shapes.render(target)[0], truth)
    assert abs(done["area_ratio"] - 1) < 0.01 and done["centroid_px"] < 0.5
    trail = shapes.render(target)[0].copy()
    trail[:, masks[0].any(0)] = shapes.COLORS["red"]  # every pixel the object ever covers, on every frame
    painted = painted_region(trail, truth)
    assert painted["area_ratio"] > 1.5 and painted["centroid_px"] > 3
    thing = target.things[0]
    moved = dataclasses.replace(target, things=(dataclasses.replace(thing, x=thing.x + 5, y=thing.y + 2),))
    assert 4 < painted_region(shapes.render(moved)[0], truth)["centroid_px"] < 6
    assert painted_region(shapes.render(source)[0], truth) == {"area_ratio": 0.0, "centroid_px": np.inf}  # not recolored


def test_psnr_outside_ignores_the_object_and_sees_the_rest(source):
    frames, masks = shapes.render(source)
    mask = dilate(masks[0], 2)
    inside = frames.copy()
    inside[mask] = 0
    assert psnr_outside(inside, frames, mask) > 90
    noisy = np.clip(frames + np.random.default_rng(0).normal(0, 8, frames.shape), 0, 255)
    assert psnr_outside(noisy, frames, mask) < 32
    truth = EditTruth(source, source, masks)
    assert edit_measures(inside, truth, reconstruction=frames)["psnr_outside_db"] > 90


def test_sample_adherence_reads_color_and_shape_per_frame(source):
    frames = shapes.render(source)[0]
    thing = source.things[0]
    right = sample_adherence(frames, thing.color, thing.shape)
    assert right["color_frames"] == 1.0 and right["shape_frames"] == 1.0
    assert sample_adherence(frames, "red", thing.shape)["color_frames"] == 0.0
    assert sample_adherence(frames, thing.color, "triangle")["shape_frames"] == 0.0
    # a background with no object: nothing is right
    empty = shapes.render(dataclasses.replace(source, things=()))[0]
    assert sample_adherence(empty, thing.color, thing.shape)["color_frames"] == 0.0


def test_a_box_mask_holds_any_shape_at_the_objects_place_and_the_object_mask_does_not():
    for spec in one_object("heldout", 6):
        thing = spec.things[0]
        box, tight = shapes.around(spec, 0, box=True), shapes.around(spec, 4)
        for shape in shapes.SHAPES:
            drawn = shapes.shape_mask(shape, thing.centroids(), thing.size)
            assert not (drawn & ~box).any(), shape
        # a square's top corners lie outside a triangle drawn 4 px larger: a shape change needs the box
        if thing.shape == "triangle":
            square = shapes.shape_mask("square", thing.centroids(), thing.size)
            assert (square & ~tight).sum() > 0.1 * square.sum()
