"""Why windows that start mid-clip edited more weakly: what a window starts on, without blending.

    python benchmarks/window_starts.py --out /tmp/ws --steps 10 --clips 2

For each window of a long shapes clip (benchmarks/long_clips.py's clips and color edit), the
window's latent frames of the clip's own encoding are inverted (fixed point, no CFG) and
color-edited as a clip of their own, with no other window and no blending, starting either
- on the window's first latent frame: for a later window four video frames, as every window
  started before the anchor existed; or
- on its anchor: the last of those four frames encoded alone, as the engine runs a later window
  (`engine.stages.windows.window_calls`).
The edited frames after the first are put back into the clip's latents and decoded; the color
share is measured on the frames of the window's latent frames from its third on (the frames next
to where the edited frames meet the clip's own are left out: the causal decoder mixes them). The
first window, which starts on the clip's first frame, is the reference. Writes window_starts.json
and WINDOW_STARTS.md into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from benchmarks.long_clips import FRAMES, SHAPES_DIR, clip_inputs, color_shares, frame_latent, invert_clip  # noqa: E402
from benchmarks.quality import device_name, table  # noqa: E402
from engine.models.components import Runtime, loaded  # noqa: E402
from engine.stages.context import StageContext  # noqa: E402
from engine.stages.decode import decode_latents  # noqa: E402
from engine.stages.editing import _latent_grid, _reference, ddim_edit  # noqa: E402
from engine.stages.embed import embed_stage  # noqa: E402
from engine.stages.inversion import ddim_invert  # noqa: E402
from engine.stages.settings import InjectSettings, inverted_spans  # noqa: E402
from engine.stages.windows import window_calls  # noqa: E402
from engine.video.masks import Mask  # noqa: E402
from engine.workflow import FIXED_POINT_ITERS  # noqa: E402

GUIDANCE = 6.0  # the edit's default, as benchmarks/long_clips.py's color edit runs


def edit_alone(transformer: torch.nn.Module, info, part: torch.Tensor, grid: torch.Tensor, source: torch.Tensor, target: torch.Tensor, steps: int) -> torch.Tensor:
    """`part` inverted and color-edited as a clip of its own (the source caption the negative prompt)."""
    trajectory: list[torch.Tensor] = []
    ddim_invert(transformer, part, source, info.scheduler_config, steps, vae_scale_spatial=info.vae_scale_spatial, refine_iters=FIXED_POINT_ITERS,
                callback=lambda state: trajectory.append(state["x"]))
    reference = _reference(trajectory, part, source, None, part.device)
    return ddim_edit(transformer, trajectory[-1], target, info.scheduler_config, steps, vae_scale_spatial=info.vae_scale_spatial, uncond=source,
                     guidance=GUIDANCE, reference=reference, inject=InjectSettings(strength=0.0), mask=grid)


def window_starts(seed: int, steps: int, device: str, cache: Path) -> list[dict[str, Any]]:
    """Each window edited alone from its first latent frame and (a later window) from its anchor."""
    name, spec, video, masks, target, mask = clip_inputs(seed)
    inv = invert_clip(name, video, spec, steps, device, cache)
    info = engine.inspect_model(SHAPES_DIR)
    runtime = Runtime.default(device, inv.dtype, compile=False)
    ctx = StageContext(info, runtime, inv.layout, engine.Reporter(), inv.entry)
    embeds = embed_stage(ctx, [spec.caption, target.caption])
    state, spans = inv.latents().to(device), inverted_spans(inv.entry, info)
    grid = _latent_grid(Mask(torch.from_numpy(mask.astype(np.float32)), "around"), spans, state.shape, info.vae_scale_temporal).to(device)
    clip = state[:, : spans[-1][1]]
    edited = {}
    with loaded("transformer", info, runtime, inv.layout.compile_dir) as transformer:
        for w, (frames, (s, e)) in enumerate(zip(window_calls(spans), spans, strict=True)):
            for start, idx in {"first latent frame": list(range(s, e)), **({"anchor": frames} if w else {})}.items():
                x = edit_alone(transformer, info, state[:, idx], grid[idx], embeds[spec.caption], embeds[target.caption], steps)
                whole = clip.clone()
                whole[:, idx[1:]] = x[:, 1:]
                edited[(w, start)] = whole
    rows = []
    with loaded("vae", info, runtime) as vae:
        for (w, start), whole in edited.items():
            share = color_shares(decode_latents(vae, whole)[0][:FRAMES], masks, target.things[0].color)
            s, e = spans[w]
            measured = [f for f in range(FRAMES) if s + 2 <= frame_latent(f) < e]
            rows.append({"clip": name, "window": f"{s}-{e}", "start": start, "frames": f"{measured[0]}-{measured[-1]}", "color_share": float(np.mean([share[f] for f in measured]))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from engine.video import shapes

    rows = [r for seed in shapes.one_object_seeds(args.clips, "heldout") for r in window_starts(seed, args.steps, args.device, args.out / "cache")]
    (args.out / "window_starts.json").write_text(json.dumps({"device": device_name(args.device), "steps": args.steps, "rows": rows}, indent=1))
    columns = [("clip", "clip", ""), ("window (latent frames)", "window", ""), ("starts on", "start", ""), ("frames measured", "frames", ""), ("color share", "color_share", ".3f")]
    text = f"`python benchmarks/window_starts.py {' '.join(sys.argv[1:])}` on {device_name(args.device)}, torch {torch.__version__}\n\n{table(rows, columns)}\n"
    (args.out / "WINDOW_STARTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
