"""The measures benchmarks/quality.py judges edits by: they must be able to fail."""

from __future__ import annotations

import pytest
import torch

import engine
from benchmarks.frame_measures import fit_classifier, ssim
from benchmarks.quality import INPUT, SIZE, TARGET, TRAINING, all_frames
from engine.models.proxy import PROXY_DIR
from engine.video.clips import HELD_OUT
from engine.video.reader import read_frames


@pytest.fixture(scope="module")
def clips() -> dict[str, torch.Tensor]:
    return {c.name: all_frames(c) for c in TRAINING}


def test_adherence_knows_the_training_clips_and_the_source_is_not_the_target(clips):
    judge = fit_classifier(clips)
    for name, frames in clips.items():
        assert judge.adherence(frames, name)["frac_target"] == 1.0
        assert judge.adherence(frames.flip(2), name)["frac_target"] == 1.0  # mirrored samples too
    # The benchmark's edit source, unedited, must score low on its target (measured: 0.002),
    # else "adherence" would pass without any edit.
    source = read_frames(HELD_OUT.path, INPUT)[0]
    assert judge.adherence(source, TARGET.name)["p_target"] < 0.1


def test_ssim_is_one_on_itself_and_low_on_another_clip(clips):
    a, b = clips["bunny_stretch"][:17], clips["bunny_burrow"][:17]
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    assert ssim(a, b) < 0.5
    # A blur keeps the layout: between the two (structure, not exact pixels).
    blurred = torch.nn.functional.avg_pool2d(a.permute(0, 3, 1, 2).float(), 3, 1, 1).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert ssim(a, b) < ssim(a, blurred) < 1.0


def test_fixed_point_beats_ddim_on_the_held_out_round_trip_at_10_steps(tmp_path):
    # benchmarks/results/QUALITY.md measured 1.49x (0.1244 -> 0.0838, fp32); the bound leaves room
    # for other CPUs' rounding, and far below the issue's 5x target, which the proxy does not meet.
    def error(**method) -> float:
        inv = engine.invert(HELD_OUT.path, PROXY_DIR, steps=10, source_prompt=HELD_OUT.captions[0], guidance=1.0,
                            verify=True, device="cpu", cache_dir=tmp_path, **SIZE, **method)
        return inv.verify["latent_rel_error"]

    assert error() / error(inversion="fixed-point") > 1.3
