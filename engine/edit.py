"""DDIM sampling under new prompts from the inverted noise, with reference K/V injection."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.denoiser import guided, predict, rotary_embeddings
from engine.injection import InjectionState, kv_injection
from engine.row_groups import rows_apart
from engine.settings import InjectSettings

if TYPE_CHECKING:
    from engine.attention_store import StoredAttention


def edit_scheduler(scheduler_config: dict[str, Any], steps: int):
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler


@dataclass(frozen=True)
class Reference:
    """Where an edit's reference attention comes from.

    Edit step i runs at the i-th largest timestep t, which inversion step j = steps - 1 - i ran
    at too. `replayed(i)` is that inversion step's input latent, so the shared reference row
    repeats the inversion's own forward pass at t (and stored attention can stand in for it
    exactly); `reached(i)` is the latent inversion step j produced, at t's noise level, which is
    what upstream's per-half rows are fed. `source_embeds` conditions the shared row;
    `stored` replays captured K/V instead of computing a reference row.
    """

    replayed: Callable[[int], torch.Tensor]
    reached: Callable[[int], torch.Tensor]
    source_embeds: torch.Tensor
    stored: "StoredAttention | None" = None


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
    row_group: int = 0,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021) of K rows at once, with reference attention injection.

    `init` and `cond` have K rows (one per prompt); `uncond` (one row) turns on CFG with rows
    laid out [uncond x K, cond x K]. Inside the injection window a reference row is appended:
    one shared row on `reference.source_embeds`, or with `inject.reference == "per-half"` one
    per edit row on that row's own embedding, as upstream's script does; with
    `inject.reference == "stored"` no row is added and captured K/V are replayed. `row_group`
    > 0 runs every block over that many rows at a time (less activation memory, same result).
    """
    scheduler = edit_scheduler(scheduler_config, steps)
    k = init.shape[0]
    cfg = uncond is not None
    embeds = torch.cat([uncond.expand(k, -1, -1), cond]) if cfg else cond
    n_edit = embeds.shape[0]
    rotary = rotary_embeddings(transformer, init.shape, vae_scale_spatial, init.device)
    state = InjectionState(n_edit=n_edit, strength=inject.strength)
    active = [reference is not None and inject.is_active(i, steps) for i in range(steps)]
    x = init
    grouped = rows_apart(transformer, row_group, state) if row_group else contextlib.nullcontext()
    with kv_injection(transformer, inject.layers, state), grouped:
        for i, t in enumerate(scheduler.timesteps):
            rows = torch.cat([x, x]) if cfg else x
            row_embeds = embeds
            state.active = active[i]
            state.stored = None
            if inject.reference == "stored" and reference is not None:
                # Read the next injected step's files while this step computes.
                upcoming = [j for j in range(i + 1 if state.active else i, steps) if active[j]]
                if upcoming:
                    reference.stored.prefetch(int(scheduler.timesteps[upcoming[0]]))
            if state.active and inject.reference == "stored":
                state.stored = reference.stored.at(int(t))
            elif state.active and inject.reference == "per-half":
                ref = reference.reached(i).to(x.dtype)
                rows = torch.cat([rows, ref.expand(n_edit, -1, -1, -1, -1)])
                row_embeds = torch.cat([embeds, embeds])
                state.ref_of = list(range(n_edit))
            elif state.active:
                rows = torch.cat([rows, reference.replayed(i).to(x.dtype)])
                row_embeds = torch.cat([embeds, reference.source_embeds.to(embeds.dtype)])
                state.ref_of = [0] * n_edit
            v = predict(transformer, rows, row_embeds, t, rotary)[:n_edit]
            x = scheduler.step(guided(v, guidance, cfg), t, x, return_dict=False)[0].to(init.dtype)
            if callback is not None:
                callback({"i": i, "t": t, "x": x})
    return x


def first_injected(scheduler_config: dict[str, Any], steps: int, inject: InjectSettings) -> int | None:
    """The timestep of the first edit step inside the injection window, if any."""
    timesteps = edit_scheduler(scheduler_config, steps).timesteps
    return next((int(t) for i, t in enumerate(timesteps) if inject.is_active(i, steps)), None)
