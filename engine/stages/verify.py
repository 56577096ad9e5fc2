"""The round-trip check of an inversion: denoise its noise back under the source prompt (no CFG,
no injection) and compare with what was inverted, in latents and in pixels."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from engine.models.components import loaded
from engine.stages.context import StageContext
from engine.stages.decode import decode_latents
from engine.stages.editing import ddim_edit
from engine.stages.embed import embed_stage
from engine.stages.settings import inverted_spans

log = logging.getLogger("cogedit")

# What the round trip's relative latent error says (docs/verify.md). On the trained proxy
# (benchmarks/results/QUALITY.md, 44 round trips) every inversion that worked ended at 0.02-0.125
# (PSNR 23-36 dB) and every one that failed at 1.02-1.07 (PSNR 8.4-8.7 dB: another picture),
# nothing in between; the limits sit in the empty gap, nearer the good side.
GOOD_BELOW = 0.15
FAILED_FROM = 0.5


def verdict(latent_rel_error: float) -> str:
    """good, poor or failed, by the round trip's relative latent error."""
    return "good" if latent_rel_error < GOOD_BELOW else ("poor" if latent_rel_error < FAILED_FROM else "failed")


def with_verdict(result: dict[str, Any]) -> dict[str, Any]:
    """A stored round trip with its verdict added (worked out on reading, never stored: the
    limits may move)."""
    return {**result, "verdict": verdict(result["latent_rel_error"])}


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of two uint8 videos, in dB."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def verify_stage(ctx: StageContext) -> None:
    """Round-trip `ctx.entry`; the result is stored with the entry (a rerun reads it back, and
    `Inversion.verify` reads it with its verdict)."""
    entry = ctx.entry
    method = entry.manifest["settings"]["invert"].get("method", "ddim")
    if entry.verify is not None:
        with ctx.reporter.phase("verify") as ph:
            ph.hit(True, _detail(entry.verify))
        _advise(entry.verify, method)
        return
    cond = embed_stage(ctx, [entry.source_prompt])[entry.source_prompt]
    noise = entry.load(entry.paths.step_file(entry.steps - 1), "latent")
    spans = inverted_spans(entry, ctx.info)  # a long clip's latents end with its windows' anchors
    with ctx.reporter.phase("verify", total=entry.steps) as ph:
        ph.hit(False)
        with loaded("transformer", ctx.info, ctx.runtime, ctx.layout.compile_dir) as transformer:
            back = ddim_edit(
                transformer, noise.to(ctx.runtime.device, ctx.runtime.dtype), cond, ctx.info.scheduler_config, entry.steps,
                vae_scale_spatial=ctx.info.vae_scale_spatial, spans=spans,
                callback=lambda state: ph.advance(),
            ).cpu()
        clean = entry.load(entry.paths.latents, "latents")
        with loaded("vae", ctx.info, ctx.runtime) as vae:
            pixels = torch.from_numpy(decode_latents(vae, back[:, : spans[-1][1]])[0])
        source = entry.load(entry.paths.frames, "frames")
        n = min(len(source), len(pixels))
        result = {
            "latent_rel_error": ((back.float() - clean.float()).norm() / clean.float().norm()).item(),
            "psnr_db": psnr_db(pixels[:n], source[:n]),
        }
        ph.record.detail = _detail(result)
    entry.set_verify(result)
    _advise(result, method)


def _detail(result: dict[str, Any]) -> str:
    return f"round trip: latent error {result['latent_rel_error']:.3g}, PSNR {result['psnr_db']:.1f} dB: {verdict(result['latent_rel_error'])}"


def _advise(result: dict[str, Any], method: str) -> None:
    """A warning when the round trip is not good, with what to try (docs/verify.md)."""
    error = result["latent_rel_error"]
    said = verdict(error)
    if said == "good":
        return
    limit = f"{error:.3g} >= {FAILED_FROM}: the inverted noise leads back to another picture" if said == "failed" else f"{error:.3g} >= {GOOD_BELOW}"
    fix = "invert again with --inversion fixed-point" if method == "ddim" else "invert again with other --steps (fixed-point flipped at some step counts on the proxy)"
    log.warning("the round trip is %s (latent error %s); %s — see docs/verify.md", said, limit, fix)
