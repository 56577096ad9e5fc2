"""DDIM sampling under new prompts from the inverted noise, with reference K/V injection (the
`ddim_edit` kernel, and `edit_stage`, which feeds it from a cached inversion)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cache.faults import maybe_die
from engine.hooks import registry as hooks
from engine.hooks.injection import InjectionState, KVInjectionConfig, apply_kv_injection, remove_kv_injection
from engine.hooks.kv_replay import StoredAttention
from engine.hooks.row_groups import RowGroupConfig, apply_row_groups, remove_row_groups
from engine.hooks.token_exchange import TokenSplit
from engine.hooks.token_split import tokens_split
from engine.models.components import loaded
from engine.models.denoiser import guided, predict, rotary_embeddings
from engine.stages.attention_store import MemoryStores, open_stored
from engine.stages.context import StageContext
from engine.stages.distributed import GuidanceSplit, Mesh, guidance_embeds
from engine.stages.schedulers import edit_scheduler
from engine.stages.settings import EditSettings, InjectSettings, inverted_spans
from engine.stages.windows import anchor_frames, blended, frames_of, window_shape
from engine.video.masks import Mask, latent_mask


@dataclass(frozen=True)
class Reference:
    """Where an edit's reference attention comes from.

    Edit step i runs at the i-th largest timestep t, which inversion step j = steps - 1 - i ran
    at too. `replayed(i)` is that inversion step's input latent, so the shared reference row
    repeats the inversion's own forward pass at t (and stored attention can stand in for it
    exactly); `reached(i)` is the latent inversion step j produced, at t's noise level, which is
    what upstream's per-half rows are fed. `source_embeds` conditions the shared row;
    `stored` replays captured K/V instead of computing a reference row (one reader per window).
    """

    replayed: Callable[[int], torch.Tensor]
    reached: Callable[[int], torch.Tensor]
    source_embeds: torch.Tensor
    stored: list[StoredAttention] | None = None


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
    split: GuidanceSplit | None = None,
    tokens: TokenSplit | None = None,
    mask: torch.Tensor | None = None,
    spans: list[tuple[int, int]] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021) of K rows at once, with reference attention injection.

    `init` and `cond` have K rows (one per prompt); `uncond` (one row) turns on CFG with rows
    laid out [uncond x K, cond x K]. Inside the injection window a reference row is appended:
    one shared row on `reference.source_embeds`, or with `inject.reference == "per-half"` one
    per edit row on that row's own embedding, as upstream's script does; with
    `inject.reference == "stored"` no row is added and captured K/V are replayed. `row_group`
    > 0 runs every block over that many rows at a time (less activation memory, same result).
    With `split` (CFG only) this process runs one half of the rows, with its own reference rows, and the
    halves' predictions are gathered every step; with `tokens` each call's tokens are split (`engine.hooks.token_split`).
    `mask` [F', 1, h, w] in 0-1 makes the edit local: after every step, where the mask is 0 the
    latent is the inversion's own at that noise level (`reference.replayed(i)`), so only the
    masked region changes (blended latent diffusion, Avrahami et al. 2023).
    `spans` (the inversion's, `engine.stages.windows`): each step predicts every window, with that
    window's frames of the trajectory as its reference, and blends them before the one scheduler
    step; `init`, the trajectory and `mask` then hold the clip's latent frames and the windows' anchors.
    """
    if mask is not None and reference is None:
        raise ValueError("a mask keeps the inversion's latents outside it: pass the reference too")
    spans = spans or [(0, init.shape[1])]
    scheduler = edit_scheduler(scheduler_config, steps)
    cfg = uncond is not None
    embeds = guidance_embeds(cond, uncond, split)
    n_edit = embeds.shape[0]
    rotary = rotary_embeddings(transformer, window_shape(init.shape, spans), vae_scale_spatial, init.device)
    state = InjectionState(n_edit=n_edit, strength=inject.strength)
    active = [reference is not None and inject.is_active(i, steps) for i in range(steps)]
    x = init
    with _edit_features(transformer, inject, state, row_group), tokens_split(transformer, tokens):  # tokens_split outermost
        for i, t in enumerate(scheduler.timesteps):
            rows = torch.cat([x, x]) if cfg and split is None else x
            state.active, state.stored = active[i], None
            if inject.reference == "stored" and reference is not None:
                _read_ahead(reference.stored, scheduler.timesteps, active, i)
            v = _guided_v(transformer, rows, embeds, i, t, rotary, state, reference, inject.reference, split, guidance, cfg, spans)
            x = scheduler.step(v, t, x, return_dict=False)[0].to(init.dtype)
            if mask is not None:
                x = torch.lerp(reference.replayed(i).to(x.dtype), x, mask)
            if callback is not None:
                callback({"i": i, "t": t, "x": x})
    return x


@contextlib.contextmanager
def _edit_features(transformer: torch.nn.Module, inject: InjectSettings, state: InjectionState, row_group: int) -> Iterator[None]:
    """K/V injection, and row groups when `row_group` > 0, on `transformer` for the edit."""
    injected = hooks.applied(transformer, apply_kv_injection, KVInjectionConfig(inject.layers, state), remove_kv_injection)
    grouped = hooks.applied(transformer, apply_row_groups, RowGroupConfig(row_group, state), remove_row_groups) if row_group else contextlib.nullcontext()
    with grouped, injected:  # injection's hook outermost: it runs before the groups do
        yield


def _read_ahead(stored: list[StoredAttention], timesteps: torch.Tensor, active: list[bool], i: int) -> None:
    """Start reading the stored K/V of the next injected step (this one's, if not read yet), of
    every window, while step i computes."""
    upcoming = [j for j in range(i + 1 if active[i] else i, len(active)) if active[j]]
    for window in stored if upcoming else ():
        window.prefetch(int(timesteps[upcoming[0]]))


def _guided_v(
    transformer: torch.nn.Module, rows: torch.Tensor, embeds: torch.Tensor, i: int, t: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
    state: InjectionState, reference: Reference | None, kind: str, split: GuidanceSplit | None, guidance: float, cfg: bool, spans: list[tuple[int, int]],
) -> torch.Tensor:
    """Edit step i's guided v over the whole clip: one transformer call per window (with that
    window's reference row when injecting), the windows blended (`engine.stages.windows`)."""

    def window(w: int, frames: slice | list[int]) -> torch.Tensor:
        part = frames_of(rows, frames)
        part, row_embeds = _with_reference(part, embeds, i, int(t), state, reference, kind, w, frames) if state.active else (part, embeds)
        v = predict(transformer, part, row_embeds, t, rotary)[: state.n_edit]
        return guided(split.combine(v) if split is not None else v, guidance, cfg)

    return blended(window, spans)


def _with_reference(
    rows: torch.Tensor, embeds: torch.Tensor, i: int, t: int, state: InjectionState, reference: Reference, kind: str, window: int, frames: slice | list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of an injected step and the state that describes it: window `window`'s replayed
    K/V (stored), one reference row per edit row (per-half), or one shared reference row; a
    reference row is the trajectory's `frames` (the window `rows` hold)."""
    n_edit = state.n_edit
    if kind == "stored":
        state.stored = reference.stored[window].at(t)
        return rows, embeds
    if kind == "per-half":
        state.ref_of = torch.arange(n_edit, device=rows.device)
        ref = frames_of(reference.reached(i), frames).to(rows.dtype)
        return torch.cat([rows, ref.expand(n_edit, -1, -1, -1, -1)]), torch.cat([embeds, embeds])
    state.ref_of = torch.zeros(n_edit, dtype=torch.long, device=rows.device)
    return torch.cat([rows, frames_of(reference.replayed(i), frames).to(rows.dtype)]), torch.cat([embeds, reference.source_embeds.to(embeds.dtype)])


def first_injected(scheduler_config: dict[str, Any], steps: int, inject: InjectSettings) -> int | None:
    """The timestep of the first edit step inside the injection window, if any."""
    timesteps = edit_scheduler(scheduler_config, steps).timesteps
    return next((int(t) for i, t in enumerate(timesteps) if inject.is_active(i, steps)), None)


def edit_stage(
    ctx: StageContext,
    settings: EditSettings,
    embeds: dict[str, torch.Tensor],
    memory: MemoryStores,
    store: str | None,
    mesh: Mesh | None = None,
    mask: Mask | None = None,
) -> torch.Tensor:
    """Edited latents [K, F', C, h, w] (CPU) from the cached inversion `ctx.entry`; `store` is the
    key of the stored attention to replay (`--reference stored`), else None; `mesh`: this process
    runs its share of every call (`--gpus N`); `mask` (whose digest is `settings.mask`) keeps the source outside it."""
    entry, runtime, steps = ctx.entry, ctx.runtime, ctx.entry.steps
    trajectory = [entry.load(entry.paths.step_file(i), "latent") for i in range(steps)]
    clean = entry.load(entry.paths.latents, "latents")
    chunks = settings.chunks()
    out = []
    with ctx.reporter.phase("edit", total=steps * len(chunks)) as ph:
        ph.record.detail = _edit_detail(settings, len(chunks), ctx, mesh, mask)

        def on_step(state: dict[str, Any]) -> None:
            maybe_die("edit")
            ph.advance()
            ctx.notify("edit", state)

        spans = inverted_spans(entry, ctx.info)
        stored = open_stored(ctx, memory, store, settings.inject, window_shape(clean.shape, spans)) if store else None
        try:
            if stored is not None and (first := first_injected(ctx.info.scheduler_config, steps, settings.inject)) is not None:
                # Read the first replayed step while the transformer loads (seconds), so that the
                # step does not start by waiting for its files.
                for window in stored:
                    window.prefetch(first)
            grid = _latent_grid(mask, spans, clean.shape, ctx.info.vae_scale_temporal).to(runtime.device, runtime.dtype) if mask is not None else None
            reference = _reference(trajectory, clean, embeds.get(entry.source_prompt, next(iter(embeds.values()))), stored, runtime.device)
            with loaded("transformer", ctx.info, runtime, ctx.layout.compile_dir) as transformer:
                for chunk in chunks:
                    x = ddim_edit(
                        transformer,
                        _init_noise(settings, trajectory[-1], len(chunk), runtime),
                        torch.cat([embeds[p] for p in chunk]),
                        ctx.info.scheduler_config,
                        steps,
                        vae_scale_spatial=ctx.info.vae_scale_spatial,
                        uncond=embeds[settings.negative_prompt] if settings.uses_cfg else None,
                        guidance=settings.guidance,
                        reference=reference,
                        inject=settings.inject,
                        row_group=runtime.plan.row_group,
                        split=mesh.guidance if mesh is not None else None,
                        tokens=mesh.tokens if mesh is not None else None,
                        mask=grid,
                        spans=spans,
                        callback=on_step,
                    )
                    out.append(x[:, : spans[-1][1]].cpu())  # the clip's frames, less the anchors
        finally:  # reader threads and pinned buffers go with a failed edit too
            for window in stored or ():
                window.close()
    return torch.cat(out)


def _edit_detail(settings: EditSettings, passes: int, ctx: StageContext, mesh: Mesh | None, mask: Mask | None) -> str:
    """The edit phase's line in the run's table: what ran, on what."""
    detail = f"from inversion {ctx.entry.id[:12]}: {len(settings.prompts)} prompt(s) in {passes} pass(es), reference {settings.inject.reference}, attention {ctx.runtime.attention}"
    if mesh is not None:
        detail += ", " + mesh.describe()
    if mask is not None:
        detail += f", local ({mask.label})"
    return detail


def _latent_grid(mask: Mask, spans: list[tuple[int, int]], shape: torch.Size, temporal: int) -> torch.Tensor:
    """The mask on the latent grid of the stepped state: the clip's latent frames, then each
    anchor's own frame (engine.stages.windows)."""
    h, w = shape[3:]
    anchors = [latent_mask(dataclasses.replace(mask, pixels=mask.pixels[f : f + 1]), 1, h, w) for f in anchor_frames(spans, temporal)]
    return torch.cat([latent_mask(mask, spans[-1][1], h, w), *anchors])


def _reference(trajectory: list[torch.Tensor], clean: torch.Tensor, source_embeds: torch.Tensor, stored, device) -> Reference:
    """Edit step i pairs with inversion step steps-1-i (same timestep); see `Reference`."""
    steps = len(trajectory)
    replayed = lambda i: (trajectory[steps - 2 - i] if i < steps - 1 else clean).to(device)  # noqa: E731
    reached = lambda i: trajectory[steps - 1 - i].to(device)  # noqa: E731
    return Reference(replayed, reached, source_embeds, stored)


def _init_noise(settings: EditSettings, inverted: torch.Tensor, rows: int, runtime) -> torch.Tensor:
    """The start of every row of a pass: the inverted noise, or one seeded noise for all prompts
    (so edits compare like for like)."""
    if settings.init == "inverted":
        noise = inverted
    else:
        g = torch.Generator().manual_seed(settings.seed)
        noise = torch.randn(inverted.shape, generator=g, dtype=torch.float32).to(inverted.dtype)
    return noise.to(runtime.device, runtime.dtype).expand(rows, -1, -1, -1, -1).contiguous()
