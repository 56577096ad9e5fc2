"""Seams of windowed clips, measured on the shapes proxy and the bunny proxy (CPU is enough).

    python benchmarks/long_clips.py --out benchmarks/results --steps 20 --clips 3
    python benchmarks/long_clips.py --out /tmp/lc --steps 4 --clips 1    # a smoke run (about a minute)

Shapes clips (engine/video/shapes.py, held-out color x shape pairs) are drawn 41 frames long at
8 fps, the object moving across the frame, so that it crosses both joins of the three windows the
shapes proxy (a window of 17 frames = 5 latent frames, 2 shared) cuts the clip into. Each is
inverted without CFG (`--frames all`, fp32), then
- reconstructed: denoised back under its caption with no guidance and no injection (the round trip);
- color-edited: the next color, with the source caption as the negative prompt, inside a mask
  around the object, no injection (the best color setting of SHAPES.md).
The held-out bunny clip (33 frames at its own 25 fps, three windows of the bunny proxy) is
reconstructed the same way. Per frame: PSNR against the source, the object's centroid (shapes),
the share of the object's pixels in the target color (shapes). Frames are "at a join" when their
latent frame lies in two windows, "inside" otherwise; the centroid's move from frame f to f+1
counts as at a join when either frame is. Served from memory for the shapes (no codec between the
truth and the engine); the bunny clip is read from its mp4. Writes into --out:

    long_clips.json   every clip's per-frame measures and the summaries
    LONG_CLIPS.md     the table, the targets met or not
    long_clips.png    frames around the first join of the first shapes clip: source | edit
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from benchmarks.quality import device_name, serving, table  # noqa: E402
from benchmarks.shape_measures import EDGE, centroid, color_index, dilate, erode, nearest, object_pixels  # noqa: E402
from engine.models.proxy import PROXY_DIR  # noqa: E402
from engine.stages.verify import psnr_db  # noqa: E402
from engine.video import shapes  # noqa: E402
from engine.video.clips import HELD_OUT  # noqa: E402
from engine.video.reader import FrameSettings, VideoInfo  # noqa: E402

SHAPES_DIR = Path(__file__).resolve().parents[1] / "engine" / "assets" / "shapes"
FRAMES = 41  # 11 latent frames: windows (0, 5), (3, 8), (6, 11) of the shapes proxy
FPS = 8.0
SPEED = 2  # px per frame: 80 px over the clip, across both joins
MASK_MARGIN = 4
SIZE = dict(height=shapes.HEIGHT, width=shapes.WIDTH, dtype="fp32")
# Plain DDIM's round trip fails on some shapes clips with one window as with three (SHAPES.md: 12-17 dB
# on shapes_heldout_000/001/005); fixed point is the round trip worth measuring seams on.
INVERSION = ["fixed-point"]
# The targets.
PSNR_GAP_DB, CENTROID_SLACK_PX, COLOR_SPREAD = 1.0, 1.0, 0.05


def crossing_clip(seed: int) -> shapes.ClipSpec:
    """Held-out clip `seed`'s object, moving right at SPEED from the left edge: it stays in the
    frame for FRAMES frames and passes every join."""
    spec = shapes.clip_spec(seed, "heldout", objects=1)
    thing = spec.things[0]
    moved = dataclasses.replace(thing, direction="right", speed=SPEED, x=thing.size + 2)
    return shapes.ClipSpec((moved,), spec.background, spec.seed)


def frame_latent(f: int) -> int:
    """The latent frame that encodes frame f (the first alone, then 4 a latent)."""
    return (f + 3) // 4


def join_frames(spans: list[list[int]], frames: int) -> np.ndarray:
    """bool [frames]: frames whose latent frame lies in more than one window."""
    cover = np.zeros(max(e for _, e in spans), dtype=int)
    for s, e in spans:
        cover[s:e] += 1
    return np.array([cover[frame_latent(f)] > 1 for f in range(frames)])


def window_frames(spans: list[list[int]], frames: int) -> list[np.ndarray]:
    """For each window, bool [frames]: the frames whose latent frame it covers."""
    return [np.array([s <= frame_latent(f) < e for f in range(frames)]) for s, e in spans]


def per_frame_psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [psnr_db(a[f], b[f]) for f in range(len(a))]


def moves(track: list[np.ndarray | None]) -> list[float | None]:
    """The centroid's move from each frame to the next, px (None where the object is lost)."""
    return [None if a is None or b is None else float(np.linalg.norm(b - a)) for a, b in zip(track, track[1:], strict=False)]


def seam_summary(psnr: list[float], move: list[float | None] | None, joins: np.ndarray) -> dict[str, Any]:
    """PSNR at joins vs inside windows; the largest centroid move at a join vs inside."""
    p = np.array(psnr)
    out = {"psnr_join_db": float(p[joins].mean()), "psnr_inside_db": float(p[~joins].mean())}
    out["psnr_gap_db"] = out["psnr_inside_db"] - out["psnr_join_db"]
    if move is not None:
        at_join = [m for f, m in enumerate(move) if m is not None and (joins[f] or joins[f + 1])]
        inside = [m for f, m in enumerate(move) if m is not None and not (joins[f] or joins[f + 1])]
        out.update(move_join_max_px=max(at_join, default=None), move_inside_max_px=max(inside, default=None), lost_frames=sum(m is None for m in move))
    return out


def object_track(frames: np.ndarray, near: np.ndarray) -> list[np.ndarray | None]:
    found = object_pixels(nearest(frames)) & near
    return [centroid(found[f]) for f in range(len(frames))]


def clip_inputs(seed: int) -> tuple[str, shapes.ClipSpec, np.ndarray, np.ndarray, shapes.ClipSpec, np.ndarray]:
    """Held-out clip `seed`: its name, spec, frames, object masks, the color edit's target and mask."""
    spec = crossing_clip(seed)
    video, masks = shapes.render(spec, FRAMES)
    target = shapes.with_change(spec, color=list(shapes.COLORS)[(list(shapes.COLORS).index(spec.things[0].color) + 1) % len(shapes.COLORS)])
    return f"long_shapes_{seed:03d}", spec, video, masks, target, shapes.around(spec, MASK_MARGIN, FRAMES)


def invert_clip(name: str, video: np.ndarray, spec: shapes.ClipSpec, steps: int, device: str, cache: Path) -> engine.Inversion:
    """The clip's inversion: every frame, no CFG, served from memory."""
    frames = len(video)
    info = VideoInfo(f"/served/{name}.mp4", f"{name}-{frames}", frames, FPS, shapes.WIDTH, shapes.HEIGHT)
    served = FrameSettings(max_frames=None, height=shapes.HEIGHT, width=shapes.WIDTH, fps=FPS)
    with serving({name: torch.from_numpy(video)}, {name: info}, served):
        return engine.invert(info.path, SHAPES_DIR, frames="all", steps=steps, source_prompt=spec.caption, guidance=1.0, inversion=INVERSION[0], **SIZE, device=device, cache_dir=cache)


def invert_and_edit(name: str, video: np.ndarray, spec: shapes.ClipSpec, target: shapes.ClipSpec, mask: np.ndarray, steps: int, device: str, cache: Path):
    """The clip's inversion, its round trip and its masked color edit."""
    inv = invert_clip(name, video, spec, steps, device, cache)
    common = dict(device=device, cache_dir=cache, output="frames")
    recon = engine.edit(inv, [spec.caption], guidance=1.0, inject_strength=0.0, **common).frames[0]
    edit = engine.edit(inv, [target.caption], negative_from_source=True, inject_strength=0.0, mask=mask.astype(np.float32), **common).frames[0]
    return inv, recon, edit


def color_shares(edit: np.ndarray, masks: np.ndarray, color: str) -> list[float]:
    """Per frame: the share of the object's pixels (away from its rim) nearest `color`."""
    labels, core = nearest(edit), erode(masks[0], EDGE)
    return [float((labels[f][core[f]] == color_index(color)).mean()) for f in range(len(edit))]


def shapes_clip(seed: int, steps: int, device: str, cache: Path, independent: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    name, spec, video, masks, target, mask = clip_inputs(seed)
    start = time.perf_counter()
    inv, recon, edit = invert_and_edit(name, video, spec, target, mask, steps, device, cache)
    spans = inv.entry.manifest["summary"]["windows"]
    joins = join_frames(spans, FRAMES)
    near = dilate(masks[0], 6)
    share = color_shares(edit, masks, target.things[0].color)
    per_window = [float(np.mean([share[f] for f in np.flatnonzero(w)])) for w in window_frames(spans, FRAMES)]
    recon_psnr = per_frame_psnr(torch.from_numpy(recon), torch.from_numpy(video))
    record = {
        "clip": name, "caption": spec.caption, "edit": target.caption, "windows": spans, "steps": steps, "seconds": round(time.perf_counter() - start, 1),
        "reconstruction": {**seam_summary(recon_psnr, moves(object_track(recon, near)), joins), "psnr_db": recon_psnr},
        "edit_motion": seam_summary(per_frame_psnr(torch.from_numpy(edit), torch.from_numpy(video)), moves(object_track(edit, near)), joins),
        "color_share": share, "color_share_per_window": per_window, "color_spread": max(per_window) - min(per_window),
    }
    if independent:
        record["independent"] = independent_windows(name, video, masks, spec, target, mask, (share, recon_psnr), steps, device, cache)
    return record, {"source": video, "edit": edit, "joins": joins}


def independent_windows(name, video, masks, spec, target, mask, blended, steps, device, cache) -> dict[str, Any]:
    """The alternative: each window's frames inverted and edited as a clip of their own (17 frames
    from frame 0, 12 and 24), against the same frames of the blended run."""
    one = (shapes.FRAMES - 1) // 4 * 4 + 1
    share, recon_psnr = blended
    out: dict[str, list] = {"first_frames": [], "color_share": [], "blended_color_share": [], "recon_psnr_db": [], "blended_recon_psnr_db": []}
    for a in range(0, FRAMES - one + 1, (FRAMES - one) // 2):
        part = slice(a, a + one)
        _, recon, edit = invert_and_edit(f"{name}_from{a:02d}", video[part], spec, target, mask[part], steps, device, cache)
        out["first_frames"].append(a)
        out["color_share"].append(float(np.mean(color_shares(edit, masks[:, part], target.things[0].color))))
        out["blended_color_share"].append(float(np.mean(share[part])))
        out["recon_psnr_db"].append(float(np.mean(per_frame_psnr(torch.from_numpy(recon), torch.from_numpy(video[part])))))
        out["blended_recon_psnr_db"].append(float(np.mean(recon_psnr[part])))
    return out


def bunny_clip(steps: int, device: str, cache: Path) -> dict[str, Any]:
    """The held-out bunny clip at its own rate, reconstructed (the bunny proxy's window is 17 frames too)."""
    start = time.perf_counter()
    inv = engine.invert(
        HELD_OUT.path, PROXY_DIR, frames="all", fps=25.0, steps=steps, source_prompt=HELD_OUT.captions[0], guidance=1.0, inversion=INVERSION[0], **SIZE, device=device, cache_dir=cache,
    )
    recon = engine.edit(inv, [HELD_OUT.captions[0]], guidance=1.0, inject_strength=0.0, device=device, cache_dir=cache, output="frames").frames[0]
    source = inv.frames()
    n = inv.entry.output_frames
    spans = inv.entry.manifest["summary"]["windows"]
    psnr = per_frame_psnr(torch.from_numpy(recon), source[:n])
    return {
        "clip": HELD_OUT.name, "caption": HELD_OUT.captions[0], "windows": spans, "steps": steps, "frames": n,
        "seconds": round(time.perf_counter() - start, 1), "reconstruction": {**seam_summary(psnr, None, join_frames(spans, n)), "psnr_db": psnr},
    }


def join_png(path: Path, shown: dict[str, np.ndarray], around: int = 3) -> None:
    """Frames around the first join (the first frame at a join, `around` either side): source over edit."""
    from PIL import Image, ImageDraw

    first = int(np.flatnonzero(shown["joins"])[0])
    picks = list(range(max(0, first - around), min(len(shown["joins"]), first + around + 1)))
    h, w = shown["source"].shape[1:3]
    label = 60
    image = Image.new("RGB", (label + w * len(picks), h * 2 + 14), "white")
    draw = ImageDraw.Draw(image)
    for r, key in enumerate(("source", "edit")):
        draw.text((4, 14 + r * h + h // 2 - 6), key, fill="black")
        for c, f in enumerate(picks):
            image.paste(Image.fromarray(shown[key][f]), (label + c * w, 14 + r * h))
            if r == 0:
                draw.text((label + c * w + 2, 1), f"{f}{' join' if shown['joins'][f] else ''}", fill="black")
    image.save(path)


def _moves_ok(r: dict[str, Any]) -> bool:
    """The largest move at a join within the slack of the largest inside (False where the object was lost)."""
    join, inside = r["move_join_max_px"], r["move_inside_max_px"]
    return join is not None and inside is not None and not r["lost_frames"] and join <= inside + CENTROID_SLACK_PX


def verdicts(records: list[dict[str, Any]], bunny: dict[str, Any]) -> list[tuple[str, bool]]:
    recon = [r["reconstruction"] for r in records]
    return [
        (f"reconstruction PSNR at joins within {PSNR_GAP_DB:g} dB of inside windows (shapes)", all(r["psnr_gap_db"] <= PSNR_GAP_DB for r in recon)),
        (f"centroid move at a join <= largest inside + {CENTROID_SLACK_PX:g} px (reconstruction)", all(_moves_ok(r) for r in recon)),
        (f"centroid move at a join <= largest inside + {CENTROID_SLACK_PX:g} px (color edit)", all(_moves_ok(r["edit_motion"]) for r in records)),
        (f"color-edit share per window within {100 * COLOR_SPREAD:g} points", all(r["color_spread"] <= COLOR_SPREAD for r in records)),
        (f"reconstruction PSNR at joins within {PSNR_GAP_DB:g} dB of inside windows (held-out bunny)", bunny["reconstruction"]["psnr_gap_db"] <= PSNR_GAP_DB),
    ]


def independent_md(records: list[dict[str, Any]]) -> list[str]:
    """The alternative (each window a clip of its own) against the blended windows, on the same frames."""
    done = [r for r in records if "independent" in r]
    if not done:
        return []
    r = done[0]
    d = r["independent"]
    rows = [{"frames": f"{a}-{a + 16}", **{k: d[k][i] for k in d if k != "first_frames"}} for i, a in enumerate(d["first_frames"])]
    columns = [("frames", "frames", ""), ("color share, blended windows", "blended_color_share", ".3f"), ("color share, window alone", "color_share", ".3f"),
               ("recon PSNR dB, blended", "blended_recon_psnr_db", ".2f"), ("recon PSNR dB, window alone", "recon_psnr_db", ".2f")]
    return [f"{r['clip']}: each window's 17 frames inverted and edited as a clip of their own, against the same frames of the blended run:", "",
            table(rows, columns), ""]


def markdown(result: dict[str, Any]) -> str:
    rows = [{"clip": r["clip"], **{k: v for k, v in r["reconstruction"].items() if k != "psnr_db"},
             "edit_join": r["edit_motion"]["move_join_max_px"], "edit_inside": r["edit_motion"]["move_inside_max_px"], "edit_lost": r["edit_motion"]["lost_frames"],
             "windows_color": " / ".join(f"{100 * s:.0f}" for s in r["color_share_per_window"]), "spread": 100 * r["color_spread"], "s": r["seconds"]}
            for r in result["shapes"]]
    b = result["bunny"]
    rows.append({"clip": b["clip"], **{k: v for k, v in b["reconstruction"].items() if k != "psnr_db"}, "s": b["seconds"]})
    columns = [("clip", "clip", ""), ("PSNR at joins dB", "psnr_join_db", ".2f"), ("PSNR inside dB", "psnr_inside_db", ".2f"), ("gap dB", "psnr_gap_db", ".2f"),
               ("recon move at join max px", "move_join_max_px", ".2f"), ("recon move inside max px", "move_inside_max_px", ".2f"),
               ("recon lost frames", "lost_frames", "d"),
               ("edit move at join max px", "edit_join", ".2f"), ("edit move inside max px", "edit_inside", ".2f"), ("edit lost frames", "edit_lost", "d"),
               ("color share per window %", "windows_color", ""), ("spread points", "spread", ".1f"), ("s", "s", ".0f")]
    lines = [
        "# Long clips: seams between windows",
        "",
        f"{result['device']}, torch {result['torch']}, {result['when']}, `{result['command']}`.",
        f"Shapes: {len(result['shapes'])} held-out clips of {FRAMES} frames at 96x144, the object moving right {SPEED} px a frame across both joins, "
        f"windows {result['shapes'][0]['windows']} (latent frames) of the shapes proxy; {result['steps']} steps, {result['inversion']} inversion without CFG. "
        f"Bunny: {b['clip']} ({b['frames']} frames at 25 fps, windows {b['windows']}) on the bunny proxy. "
        "Reconstruction: the round trip (no guidance, no injection). Color edit: the next color, the source caption as negative prompt, "
        f"mask {MASK_MARGIN} px around the object, no injection. A frame is at a join when its latent frame lies in two windows.",
        "",
        table(rows, columns),
        "",
        *independent_md(result["shapes"]),
        "| target | met |",
        "| --- | --- |",
        *[f"| {name} | {ok} |" for name, ok in verdicts(result["shapes"], result["bunny"])],
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--independent", action="store_true", help="on the first clip, also each window inverted and edited on its own")
    ap.add_argument("--inversion", default="fixed-point", choices=["ddim", "fixed-point"])
    ap.add_argument("--cache", type=Path, default=None, help="cache folder (default: a fresh one under --out)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.cache or args.out / "long_clips_cache"
    INVERSION[0] = args.inversion
    records, shown = [], None
    for seed in shapes.one_object_seeds(args.clips, "heldout"):
        record, frames = shapes_clip(seed, args.steps, args.device, cache, args.independent and not records)
        records.append(record)
        shown = shown or frames
        print(json.dumps({k: v for k, v in record.items() if k != "reconstruction"}), flush=True)
    bunny = bunny_clip(args.steps, args.device, cache)
    result = {
        "device": device_name(args.device), "torch": torch.__version__, "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/long_clips.py " + " ".join(sys.argv[1:]), "steps": args.steps, "inversion": args.inversion, "shapes": records, "bunny": bunny,
    }
    (args.out / "long_clips.json").write_text(json.dumps(result, indent=1, default=float))
    (args.out / "LONG_CLIPS.md").write_text(markdown(result))
    join_png(args.out / "long_clips.png", shown)
    print(markdown(result))


if __name__ == "__main__":
    main()
