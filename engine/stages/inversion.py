"""DDIM inversion: clean video latents -> noise, keeping the latent after every step (the
`ddim_invert` kernel, and `invert_stage`, which caches every step so a run resumes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cache.faults import maybe_die
from engine.hooks.token_split import tokens_split
from engine.models.components import loaded
from engine.models.denoiser import guided, predict, rotary_embeddings
from engine.stages.attention_store import MemoryStores, capturing
from engine.stages.context import StageContext
from engine.stages.distributed import Mesh, guidance_embeds, tell_team
from engine.stages.fixed_point import refine, step_coefficients
from engine.stages.schedulers import edit_scheduler, inverse_scheduler
from engine.stages.settings import InvertSettings, StoreSettings
from engine.stages.windows import blended, frames_of, window_shape


@torch.no_grad()
def ddim_invert(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    cond: torch.Tensor,
    scheduler_config: dict[str, Any],
    steps: int,
    *,
    vae_scale_spatial: int,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    start: int = 0,
    refine_iters: int = 0,
    spans: list[tuple[int, int]] | None = None,
    mesh: Mesh | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """DDIM inversion (Song et al. 2021, eq. 12 run from t=0 up). Returns the final noise.

    `latents` is the clean latent, or with `start=k` the latent after step k-1 (resume); with
    `spans` of several windows, the clip's latent frames followed by the windows' anchors.
    `uncond` set means classifier-free guidance with rows [uncond, cond]. `refine_iters` > 0
    refines each step towards the exact inverse of the edit step (`engine.stages.fixed_point`).
    `spans` (`engine.stages.windows`) cut a long latent sequence into windows whose predictions are
    blended before each step: the trajectory stays one sequence, the mirror of the edit's. The
    callback gets {"i", "t", "x", "forwards"} after every step, x being the latent after step i.
    `mesh`: this process computes its share of every call (its guidance half, its tokens), gathered.
    """
    scheduler = inverse_scheduler(scheduler_config, steps)
    edit = edit_scheduler(scheduler_config, steps) if refine_iters else None
    spans = spans or [(0, latents.shape[1])]
    rotary = rotary_embeddings(transformer, window_shape(latents.shape, spans), vae_scale_spatial, latents.device)
    cfg = uncond is not None
    half = mesh.guidance if mesh is not None else None
    embeds = guidance_embeds(cond, uncond, half)
    x = latents
    for i, t in enumerate(scheduler.timesteps):
        if i < start:
            continue

        def v_at(y: torch.Tensor, t: torch.Tensor = t) -> torch.Tensor:
            y = y.to(latents.dtype)

            def window(w: int, frames: slice | list[int]) -> torch.Tensor:
                part = frames_of(y, frames)
                v = predict(transformer, torch.cat([part, part]) if cfg and half is None else part, embeds, t, rotary)
                return guided(half.combine(v) if half is not None else v, guidance, cfg)

            with tokens_split(transformer, mesh.tokens if mesh is not None else None):
                return blended(window, spans)

        plain = scheduler.step(v_at(x), t, x, return_dict=False)[0]
        forwards = 1
        if edit is not None:
            plain, extra, _ = refine(v_at, x, plain, *step_coefficients(edit, t), refine_iters)
            forwards += extra
        # The model's dtype between steps, as upstream: what is cached is exactly what resumes.
        x = plain.to(latents.dtype)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "forwards": forwards})
    return x


@dataclass(frozen=True)
class InversionJob:
    """What every worker of a team needs to compute its share of worker 0's inversion steps."""

    latents: torch.Tensor  # the clean latent, or the latent after step start-1
    cond: torch.Tensor
    uncond: torch.Tensor | None
    settings: InvertSettings
    start: int
    spans: list[tuple[int, int]]

    def run(self, ctx: StageContext, transformer: torch.nn.Module, mesh: Mesh | None, callback: Callable[[dict[str, Any]], None]) -> None:
        runtime = ctx.runtime
        ddim_invert(
            transformer,
            self.latents.to(runtime.device, runtime.dtype),
            self.cond.to(runtime.device),
            ctx.info.scheduler_config,
            self.settings.steps,
            vae_scale_spatial=ctx.info.vae_scale_spatial,
            uncond=None if self.uncond is None else self.uncond.to(runtime.device),
            guidance=self.settings.guidance,
            start=self.start,
            refine_iters=self.settings.iters,
            spans=self.spans,
            mesh=mesh,
            callback=callback,
        )


def invert_stage(
    ctx: StageContext, settings: InvertSettings, latents: torch.Tensor, embeds: dict[str, torch.Tensor], store: StoreSettings, memory: MemoryStores, mesh: Mesh | None = None
) -> None:
    """Invert into `ctx.entry`, from its last finished step; each step's latent is cached as it lands.
    With `mesh` this is worker 0 of a team: the others compute their shares with it (`follow_inversion`)."""
    entry, runtime = ctx.entry, ctx.runtime
    start = entry.steps_done
    with ctx.reporter.phase("invert", total=settings.steps) as ph:
        ph.total(settings.steps, start)
        ph.hit(False, (f"resumed at step {start}" if start else f"{2 if settings.uses_cfg else 1} row(s)") + f", attention {runtime.attention}")
        if mesh is not None:
            ph.record.detail += ", " + mesh.describe()
        x = entry.load(entry.paths.step_file(start - 1), "latent") if start else latents

        forwards: list[int] = []

        def on_step(state: dict[str, Any]) -> None:
            forwards.append(state["forwards"])
            entry.save(entry.paths.step_file(state["i"]), {"latent": state["x"]}, t=int(state["t"]))
            entry.mark_step(state["i"])  # after the step file: a crash loses at most one step
            maybe_die("step")
            ph.advance()
            ctx.notify("invert", state)

        uncond = embeds[settings.negative_prompt] if settings.uses_cfg else None
        job = InversionJob(x.cpu(), embeds[settings.source_prompt], uncond, settings, start, settings.spans(ctx.info.vae_latent_frames(entry.frames)))
        if mesh is not None:
            tell_team(dataclasses.replace(job, cond=job.cond.cpu(), uncond=None if uncond is None else uncond.cpu()))
        with loaded("transformer", ctx.info, runtime, ctx.layout.compile_dir) as transformer, capturing(ctx, transformer, store, memory):
            job.run(ctx, transformer, mesh, on_step)
        if settings.method != "ddim" and forwards:
            ph.record.detail += f", {settings.method}: {sum(forwards) / len(forwards):.2f} forwards/step"


def follow_inversion(ctx: StageContext, mesh: Mesh) -> None:
    """A worker other than 0 of a team: compute its share of every step of worker 0's inversion
    (none if worker 0 found it cached), until worker 0 says it is done. Nothing is written here."""
    while (job := tell_team(None)) is not None:
        with loaded("transformer", ctx.info, ctx.runtime, ctx.layout.compile_dir) as transformer:
            job.run(ctx, transformer, mesh, lambda state: maybe_die("step"))
