"""DDIM sampling under new prompts from the inverted noise, with reference K/V injection."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.denoiser import guided, predict, rotary_embeddings
from engine.injection import InjectionState, kv_injection
from engine.settings import InjectSettings


def edit_scheduler(scheduler_config: dict[str, Any], steps: int):
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler


@dataclass(frozen=True)
class Reference:
    """The inversion trajectory as a source of reference rows.

    `latent(i)` is the trajectory latent at edit step i's noise level: edit step i runs at the
    i-th largest timestep, which the inversion reached after its step (steps - 1 - i).
    `source_embeds` conditions the shared reference row.
    """

    latent: Callable[[int], torch.Tensor]
    source_embeds: torch.Tensor


@torch.no_grad()
def ddim_edit(
    transformer: torch.nn.Module,
    init: torch.Tensor,
    cond: torch.Tensor,
    scheduler_config: dict[str, Any],
    steps: int,
    *,
    vae_scale_spatial: int,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    reference: Reference | None = None,
    inject: InjectSettings = InjectSettings(),
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021) of K rows at once, with reference attention injection.

    `init` and `cond` have K rows (one per prompt); `uncond` (one row) turns on CFG with rows
    laid out [uncond x K, cond x K]. Inside the injection window a reference row is appended:
    one shared row on `reference.source_embeds`, or with `inject.reference == "per-half"` one
    per edit row on that row's own embedding, as upstream's script does.
    """
    scheduler = edit_scheduler(scheduler_config, steps)
    k = init.shape[0]
    cfg = uncond is not None
    embeds = torch.cat([uncond.expand(k, -1, -1), cond]) if cfg else cond
    n_edit = embeds.shape[0]
    rotary = rotary_embeddings(transformer, init.shape, vae_scale_spatial)
    state = InjectionState(n_edit=n_edit, strength=inject.strength)
    per_half = inject.reference == "per-half"
    x = init
    with kv_injection(transformer, inject.layers, state):
        for i, t in enumerate(scheduler.timesteps):
            rows = torch.cat([x, x]) if cfg else x
            row_embeds = embeds
            state.active = reference is not None and inject.is_active(i, steps)
            if state.active:
                ref = reference.latent(i).to(x.dtype)
                if per_half:
                    rows = torch.cat([rows, ref.expand(n_edit, -1, -1, -1, -1)])
                    row_embeds = torch.cat([embeds, embeds])
                    state.ref_of = list(range(n_edit))
                else:
                    rows = torch.cat([rows, ref])
                    row_embeds = torch.cat([embeds, reference.source_embeds.to(embeds.dtype)])
                    state.ref_of = [0] * n_edit
            v = predict(transformer, rows, row_embeds, t, rotary)[:n_edit]
            x = scheduler.step(guided(v, guidance, cfg), t, x, return_dict=False)[0].to(init.dtype)
            if callback is not None:
                callback({"i": i, "t": t, "x": x})
    return x
