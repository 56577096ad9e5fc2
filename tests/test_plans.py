"""Memory plans: predictions, choice by VRAM, and refusals that say what to do."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import engine
from cli import cli
from engine.components import builtin_5b
from engine.errors import SettingsError
from engine.plans import GiB, PLANS, choose_plan, param_counts, predict_peaks


def test_parameter_counts_are_the_5b_model():
    counts = param_counts(builtin_5b())
    assert round(counts["transformer"] / 1e9, 2) == 5.57
    assert round(counts["text_encoder"] / 1e9, 2) == 4.76


def test_smaller_cards_get_leaner_plans():
    info = builtin_5b()
    peaks = {name: max(predict_peaks(p, info).values()) for name, p in PLANS.items()}
    assert peaks["offload"] < peaks["nf4"] < peaks["int8"] < peaks["lean"] < peaks["staged"] < 16 * GiB
    assert choose_plan(24 * 10**9, info).name == "staged"
    assert choose_plan(8 * 10**9, info).name in ("offload", "nf4")
    with pytest.raises(SettingsError, match="no plan fits"):
        choose_plan(1 * 10**9, info)


def test_plan_command_prints_every_plan_and_the_choice():
    result = CliRunner().invoke(cli, ["plan", "--vram", "24GB"])
    assert result.exit_code == 0, result.output
    for name in PLANS:
        assert name in result.output
    assert result.output.strip().splitlines()[-1] == "staged"


def test_gpu_plans_are_refused_on_cpu_with_the_fix(tiny_model, wide_clip):
    with pytest.raises(SettingsError, match="needs a CUDA GPU"):
        engine.invert(wide_clip, tiny_model, device="cpu", plan="offload", frames=9, height=96, width=160, steps=2)
    with pytest.raises(SettingsError, match="unknown --plan"):
        engine.invert(wide_clip, tiny_model, device="cpu", plan="huge", frames=9, height=96, width=160, steps=2)


def test_ff_chunking_leaves_the_output_unchanged(tiny_model):
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from engine.ff_chunking import apply_ff_chunking

    model = CogVideoXTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer").eval()
    x = torch.randn(2, 3, 16, 12, 20)
    text = torch.randn(2, 226, 32)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        plain = model(x, text, t, return_dict=False)[0]
        apply_ff_chunking(model, 100)
        chunked = model(x, text, t, return_dict=False)[0]
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
