"""Stored attention: capture during inversion, replay during edits (tiny model, CPU)."""

from __future__ import annotations

import pytest
import torch

import engine
from engine.attention_store import MEMORY_STORES
from engine.errors import SettingsError
from tests.conftest import SMALL

PROMPT = ["a watercolor painting"]


def _store(where, **kw):
    return dict(attention_store=where, attention_steps="0:0.5", **kw)


@pytest.mark.parametrize("where", ["disk", "cpu"])
def test_stored_replay_equals_recomputed_reference(tiny_model, bikes, where):
    inv = engine.invert(bikes, tiny_model, device="cpu", **SMALL, **_store(where))
    recompute = engine.edit(inv, PROMPT, inject_steps="0:0.5", device="cpu", output="latents")
    stored = engine.edit(inv, PROMPT, inject_steps="0:0.5", reference="stored", device="cpu", output="latents")
    # Same forward pass at the same timestep; only the batch it ran in differs.
    torch.testing.assert_close(stored.latents, recompute.latents, rtol=0, atol=1e-5)
    MEMORY_STORES.clear()


def test_capture_does_not_change_the_trajectory(tiny_model, bikes, tmp_path):
    plain = engine.invert(bikes, tiny_model, device="cpu", cache_dir=tmp_path / "a", **SMALL)
    captured = engine.invert(bikes, tiny_model, device="cpu", cache_dir=tmp_path / "b", **SMALL, **_store("disk"))
    for a, b in zip(plain.trajectory(), captured.trajectory(), strict=True):
        assert torch.equal(a, b)
    assert captured.manifest["attention"], "the store is recorded in the manifest"


def _shards(inv):
    from cache.atomic import load_tensors

    return {p.name: load_tensors(p) for p in sorted(inv.paths.attention_dir.rglob("*.safetensors"))}


def test_store_added_later_is_captured_from_the_cached_trajectory(tiny_model, bikes, tmp_path):
    first = engine.invert(bikes, tiny_model, device="cpu", **SMALL)
    reporter = engine.Reporter()
    later = engine.invert(bikes, tiny_model, device="cpu", reporter=reporter, **SMALL, **_store("disk"))
    assert later.id == first.id
    assert [r.name for r in reporter.records].count("capture") == 1
    assert "invert" not in [r.name for r in reporter.records], "the trajectory is not recomputed"
    during = engine.invert(bikes, tiny_model, device="cpu", cache_dir=tmp_path / "b", **SMALL, **_store("disk"))
    a, b = _shards(later), _shards(during)
    assert list(a) == list(b) == ["t_0749.safetensors", "t_0999.safetensors"]
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(a[name][key], b[name][key], rtol=0, atol=1e-6)


# Measured on the tiny model: bf16 5e-5, fp8 1.9e-3 relative error of the edited latents.
@pytest.mark.parametrize(("dtype", "tol"), [("bf16", 1e-3), ("fp8", 1e-2)])
def test_low_precision_stores_stay_close(tiny_model, bikes, dtype, tol):
    inv = engine.invert(bikes, tiny_model, device="cpu", **SMALL, **_store("disk", attention_dtype=dtype))
    exact = engine.edit(inv, PROMPT, inject_steps="0:0.5", device="cpu", output="latents").latents
    lossy = engine.edit(inv, PROMPT, inject_steps="0:0.5", reference="stored", device="cpu", output="latents").latents
    rel = ((lossy - exact).norm() / exact.norm()).item()
    print(f"{dtype} store: relative latent error {rel:.2e}")
    assert rel < tol


def test_store_over_budget_is_refused_before_writing(tiny_model, bikes, _isolated_cache):
    with pytest.raises(SettingsError, match="budget") as info:
        # One block-step is 101.5 KiB here (fp32 on the CPU): 240 kB holds two, one step of both blocks.
        engine.invert(bikes, tiny_model, device="cpu", attention_budget=240_000, **SMALL, **_store("disk"))
    assert "try --attention-steps 0:0.25" in str(info.value)
    assert not list((_isolated_cache / "inversions").glob("*")), "nothing was written"


def test_replay_outside_the_stored_window_is_refused(tiny_model, bikes):
    inv = engine.invert(bikes, tiny_model, device="cpu", **SMALL, **_store("disk"))
    with pytest.raises(SettingsError, match="no stored attention"):
        engine.edit(inv, PROMPT, inject_steps="0:1", reference="stored", device="cpu", output="latents")


def test_lean_plan_runs_rows_apart_against_the_store(tiny_model, bikes):
    inv = engine.invert(bikes, tiny_model, device="cpu", **SMALL, **_store("disk"))
    prompts = ["a watercolor painting", "a charcoal sketch"]
    staged = engine.edit(inv, prompts, inject_steps="0:0.5", device="cpu", output="latents")
    lean = engine.edit(inv, prompts, inject_steps="0:0.5", plan="lean", device="cpu", output="latents")
    torch.testing.assert_close(lean.latents, staged.latents, rtol=0, atol=1e-5)
