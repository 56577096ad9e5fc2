"""Regional compilation survives every feature: one graph per distinct block computation, however
many blocks, and no recompile limit hit (issue 17). Dynamo's guards are what broke: each block's
hooked forward was its own object, so each block was a new graph."""

from __future__ import annotations

import functools

import pytest
import torch
from torch._dynamo.utils import counters

import engine
from engine.models.tiny import build_tiny_model
from tests.conftest import SMALL

LAYERS = 9  # above dynamo's recompile limit (8): per-block graphs would hit it


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("deep") / "tiny-9-blocks", layers=LAYERS)


@pytest.fixture
def eager_backend(monkeypatch):
    """torch.compile with dynamo's guards and graphs but no code generation: what this test
    counts is dynamo's, and inductor on a 2-core CPU would take minutes."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


def test_compiled_blocks_are_one_graph_per_feature_not_per_block(deep_model, wide_clip, tmp_path, eager_backend, stand_in):
    run = dict(device="cpu", cache_dir=tmp_path / "cache", compile=True)
    inv = engine.invert(wide_clip, deep_model, attention_store="cpu", inversion="fixed-point", **run, **{**SMALL, "steps": 2})
    after_invert = counters["stats"]["unique_graphs"]
    prompts = ["a watercolor painting", "a charcoal sketch"]
    edits = {
        "shared": engine.edit(inv, prompts, output="latents", inject_steps="0:0.5", inject_layers="0-5", **run),
        "per-half": engine.edit(inv, prompts, output="latents", reference="per-half", **run),
        "stored": engine.edit(inv, prompts, output="latents", reference="stored", **run),
        "lean": engine.edit(inv, prompts, output="latents", plan="lean", **run),
        # FA4 (a CPU stand-in that dynamo cannot trace, as it cannot trace FA4's CuTe DSL): one custom op in the
        # block; every block injecting at every step, so one graph more (its merged and its self-attention calls).
        "fa4": engine.edit(inv, prompts[:1], output="latents", attention="fa4", **run),
    }
    graphs = counters["stats"]["unique_graphs"]
    # One graph per distinct block computation, whatever the number of blocks: the inversion's
    # plain and capturing blocks; the edit's injecting and plain blocks, the injecting block on
    # another batch (per-half: a reference row per edit row) and on replayed K/V (stored); the
    # injecting block with FA4 (called without its custom op, its graph breaks made 19 graphs). The
    # lean plan's row groups run eagerly. At main each block was a graph of its own, and the
    # 9th block hit dynamo's recompile limit (the fixture raises on it).
    assert after_invert == 2, dict(counters["stats"])
    assert graphs == 7, dict(counters["stats"])
    assert stand_in.calls > 0
    eager = engine.edit(inv, prompts, output="latents", inject_steps="0:0.5", inject_layers="0-5", device="cpu", cache_dir=tmp_path / "cache", compile=False)
    torch.testing.assert_close(edits["shared"].latents, eager.latents, rtol=0, atol=1e-5)



def test_compiled_windows_of_a_long_clip_share_one_windows_graphs(tiny_model, wide_clip, tmp_path, eager_backend):
    """Every window (anchored or not) is a call of the same shape: a long clip compiles the graphs
    one window does, and its compiled edit is the eager one."""
    run = dict(device="cpu", cache_dir=tmp_path / "cache", compile=True)
    long = {**SMALL, "frames": 17, "steps": 2, "window_overlap": 1}  # 2 windows of 3 latent frames on the tiny model
    inv = engine.invert(wide_clip, tiny_model, **run, **long)
    assert len(inv.entry.manifest["summary"]["windows"]) == 2
    compiled = engine.edit(inv, ["a watercolor painting"], output="latents", inject_steps="0:0.5", **run)
    # the inversion's plain block; the edit's injecting and plain blocks
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    eager = engine.edit(inv, ["a watercolor painting"], output="latents", inject_steps="0:0.5", device="cpu", cache_dir=tmp_path / "cache", compile=False)
    torch.testing.assert_close(compiled.latents, eager.latents, rtol=0, atol=1e-5)
