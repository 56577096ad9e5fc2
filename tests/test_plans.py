"""Memory plans: predictions, choice by VRAM, and refusals that say what to do."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner

import engine
from cli import cli
from engine.errors import SettingsError
from engine.models.configs import PARAMS_5B
from engine.models.model_info import builtin_5b
from engine.models.plans import PLANS, GiB, card_sizes, choose_plan, param_counts, parse_vram, predict_peaks


def test_parameter_counts_are_the_5b_model():
    counted = param_counts(dataclasses.replace(builtin_5b(), known_params=None))  # on the meta device
    assert counted == param_counts(builtin_5b()) == PARAMS_5B
    assert round(counted["transformer"] / 1e9, 2) == 5.57
    assert round(counted["text_encoder"] / 1e9, 2) == 4.76


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


@pytest.mark.parametrize(("text", "gib"), [("12GB", 12), ("12", 12), ("12GiB", 12), ("12G", 12), ("16 gb", 16), ("1.5GB", 1.5), ("1TB", 1024)])
def test_vram_is_read_as_cards_are_sold(text, gib):
    assert parse_vram(text) == int(gib * GiB)  # a card sold as 12 GB has 12 GiB
    with pytest.raises(ValueError, match="GB on a card means GiB"):
        parse_vram("twelve")


@pytest.mark.parametrize("text", ["24MB", "24000MB", "512KiB", "12M", "100B", "12iB"])
def test_vram_below_gigabytes_is_refused_with_the_accepted_forms(text):
    """No card is sold in MB: `--vram 24MB` is refused up front, not read as 0.02 GiB that fits no plan."""
    result = CliRunner().invoke(cli, ["plan", "--vram", text])
    assert result.exit_code == 2 and "no plan fits" not in result.output
    assert f"cannot read --vram {text!r}: write the card's memory in GB, e.g. 12GB, 12 or 16GiB" in result.output


def test_readme_plan_table_is_the_plans_own_description():
    """One source: each plan's description and the cards --vram gives it, in the README's table,
    are PLANS' summaries and card_sizes (what `cogedit plan` prints)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Memory plans")[1].split("\n## ")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            rows[cells[0].split("`")[1]] = cells[1:3]
    cards = card_sizes(builtin_5b())
    expected = {name: [plan.summary, cards[name]] for name, plan in PLANS.items()}
    assert rows == expected, "README's plan table: " + "; ".join(f"`{n}` | {s} | {c}" for n, (s, c) in expected.items())
    assert cards == {"staged": "15 GB and up", "lean": "12-14 GB", "int8": "11 GB", "nf4": "by name only", "offload": "5-10 GB"}
    shown = CliRunner(env={"COLUMNS": "200"}).invoke(cli, ["plan"]).output
    for summary, card in expected.values():
        assert summary in shown and card in shown


@pytest.mark.parametrize(("vram", "plan"), [("12GB", "lean"), ("12", "lean"), ("12GiB", "lean"), ("16GB", "staged"), ("24GB", "staged"), ("11GB", "int8"), ("8GB", "offload")])
def test_vram_picks_the_plan_the_readme_promises_for_that_card(vram, plan):
    result = CliRunner().invoke(cli, ["plan", "--vram", vram])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == plan


def test_plan_table_is_readable_at_80_columns():
    result = CliRunner(env={"COLUMNS": "80"}).invoke(cli, ["plan", "--vram", "12GB"])
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80 and "…" not in result.output
    for plan in PLANS.values():
        for word in plan.summary.split():
            assert word in result.output  # wrapped between words, never through one
    assert "lean <-" in result.output


def test_gpu_plans_are_refused_on_cpu_with_the_fix(tiny_model, wide_clip):
    with pytest.raises(SettingsError, match="needs a CUDA GPU"):
        engine.invert(wide_clip, tiny_model, device="cpu", plan="offload", frames=9, height=96, width=160, steps=2)
    with pytest.raises(SettingsError, match="unknown --plan"):
        engine.invert(wide_clip, tiny_model, device="cpu", plan="huge", frames=9, height=96, width=160, steps=2)


def test_ff_chunking_leaves_the_output_unchanged(tiny_model):
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from engine.hooks.ff_chunking import FFChunkingConfig, apply_ff_chunking

    model = CogVideoXTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer").eval()
    x = torch.randn(2, 3, 16, 12, 20)
    text = torch.randn(2, 226, 32)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        plain = model(x, text, t, return_dict=False)[0]
        apply_ff_chunking(model, FFChunkingConfig(100))
        sizes = []  # tokens per MLP call: 226 text + 180 image tokens in slices of 100, the last one 6
        for block in model.transformer_blocks:
            block.ff.inner.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[1]))
        chunked = model(x, text, t, return_dict=False)[0]
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)
    assert sizes == [100, 100, 100, 100, 6] * len(model.transformer_blocks)


def test_a_chunked_feed_forward_hands_every_argument_to_each_slice():
    import torch

    from engine.hooks.ff_chunking import ChunkedFeedForward

    class Scaled(torch.nn.Module):  # a per-token MLP with an extra positional and keyword argument
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 6)

        def forward(self, x, scale, *, shift=0.0):
            return self.linear(x) * scale + shift

    mlp, x = Scaled(), torch.randn(2, 7, 4)
    for chunk in (3, 7):  # sliced (3 + 3 + 1 tokens), and short enough for one call
        torch.testing.assert_close(ChunkedFeedForward(mlp, chunk)(x, 2.0, shift=1.0), mlp(x, 2.0, shift=1.0), rtol=0, atol=1e-6)


def test_compile_is_on_by_default_only_where_it_was_measured_to_pay(monkeypatch):
    from engine.models import components
    from engine.models.components import Runtime, compile_by_default

    assert compile_by_default("cuda", PLANS["staged"], triton=True) and compile_by_default("cuda:1", PLANS["lean"], triton=True)
    assert not compile_by_default("cuda", PLANS["staged"], triton=False)  # torch.compile's GPU back-end is missing
    assert not any(compile_by_default("cuda", PLANS[name], triton=True) for name in ("offload", "int8", "nf4"))
    assert not compile_by_default("cpu", PLANS["staged"], triton=True)
    assert Runtime.default("cpu").compile is False and Runtime.default("cpu", compile=True).compile is True
    # E2E.md: the edit's compile pays within 50 steps, the inversion's does not.
    assert not compile_by_default("cuda", PLANS["staged"], triton=True, phase="invert")
    # Each phase's default is one entry: flipping it changes that phase only.
    monkeypatch.setitem(components.COMPILE_PHASES, "invert", True)
    monkeypatch.setitem(components.COMPILE_PHASES, "edit", False)
    assert not compile_by_default("cuda", PLANS["staged"], triton=True, phase="edit")
    assert compile_by_default("cuda", PLANS["staged"], triton=True, phase="invert")
