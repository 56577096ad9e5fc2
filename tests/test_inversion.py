"""DDIM inversion against an inverse-DDIM loop written out from the formulas (tests/test_structure.py)."""

from __future__ import annotations

import torch

from engine.stages.inversion import ddim_invert
from tests.test_engine import _scheduler_config, _transformer
from tests.test_structure import _independent_inverse_ddim

# The tiny transformer's latent grid (SMALL's 9 frames at 96x160) and its text width.
LATENT = (1, 3, 16, 12, 20)
TEXT = (1, 226, 32)


def test_guided_inversion_matches_an_independent_guided_loop(tiny_model):
    """A distinct negative prompt and guidance 6: the rows' order now decides the result
    (u + w(c - u) against c + w(u - c)), which equal prompts cannot show."""
    g = torch.Generator().manual_seed(0)
    latents, cond, uncond = torch.randn(LATENT, generator=g), torch.randn(TEXT, generator=g), torch.randn(TEXT, generator=g)
    steps = 3
    ours = ddim_invert(_transformer(tiny_model), latents, cond, _scheduler_config(tiny_model), steps, vae_scale_spatial=8, uncond=uncond, guidance=6.0)
    theirs = _independent_inverse_ddim(tiny_model, latents, cond, steps, uncond=uncond, guidance=6.0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    unguided = _independent_inverse_ddim(tiny_model, latents, cond, steps)
    assert (theirs - unguided).abs().max() > 1e-2  # guidance matters here, so a wrong guidance shows
