"""Box edits on the shapes proxy: does a color edit inside a box keep the object, or paint the box?

    python benchmarks/box_edits.py --model engine/assets/shapes --out $OUT --clips 10 --skip-clips 52
    python benchmarks/box_edits.py --model engine/assets/shapes --out /tmp/b --clips 1 --steps 4   # a smoke run

Held-out shapes clips (engine/video/shapes.py, split "heldout": one object whose color x shape pair
the proxy never saw) are served to `engine.invert` from memory and edited to the next color with
the color recipe (negative-prompt inversion: invert with guidance 1, edit with the source caption
as the negative prompt, no injection) inside a box a user would type: the object's bounding box
grown by --margin px, rounded outwards to hundredths of the frame. The boxes:

- path box: one box around the object's whole path (every frame's box together);
- start/end boxes: the box around the object on the first frame and on the last
  (`mask_box` and `mask_box_end`), moving linearly in between;
- with `mask_fit="object"` (the box shrunk to what stands apart from its edge), and with
  `mask_paste=True` too (the decoded edit put into the source through that mask, frame by frame).

Measured exactly (benchmarks/shape_measures.py): the share of the object's pixels in the target
color, the target-colored area against the object's (over the whole frame, every frame), and the
distance between the target-colored region's centroid and the object's (mean over frames). A
clip passes when the area is at most AREA_RATIO x the object's, the centroid within CENTROID_PX
and at least COLOR_SHARE of the object is recolored. Writes into --out: box_edits.json (every
clip's measures, the command, machine, date), BOX_EDITS.md (the table) and box_edits.png
(source | edits, frames 0, 5, 11, 16).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from benchmarks.quality import device_name, grid_png, serving, table  # noqa: E402
from benchmarks.shape_measures import EditTruth, edit_measures, painted_region  # noqa: E402
from benchmarks.shapes_quality import INPUT, INVERT, clip_name, edit_targets, held_out_clips  # noqa: E402
from engine.video import shapes  # noqa: E402
from engine.video.masks import box_text  # noqa: E402
from engine.video.reader import VideoInfo  # noqa: E402

# The targets: per clip (the recolored share is the color recipe's own bar, so an edit that
# colors nothing cannot pass), and the share of clips that must pass.
AREA_RATIO, CENTROID_PX, COLOR_SHARE, CLIP_SHARE = 1.5, 3.0, 0.8, 0.9
RECIPE = dict(negative_from_source=True, inject_strength=0.0)  # the color recipe's edit (its inversion: guidance 1)
SETTINGS = {
    "path box": dict(path=True),
    "path box, fit to the object": dict(path=True, mask_fit="object"),
    "path box, fit, pasted": dict(path=True, mask_fit="object", mask_paste=True),
    "start/end boxes, fit, pasted": dict(path=False, mask_fit="object", mask_paste=True),
}


def around(mask: np.ndarray, margin: int) -> str:
    """The bounding box of bool [..., H, W] grown by `margin` px, as a user would type it."""
    ys, xs = np.nonzero(mask.reshape(-1, *mask.shape[-2:]).any(0))
    h, w = mask.shape[-2:]
    return box_text((xs.min() - margin) / w, (ys.min() - margin) / h, (xs.max() + 1 + margin) / w, (ys.max() + 1 + margin) / h)


def boxes(masks: np.ndarray, path: bool, margin: int) -> dict[str, str]:
    """`engine.edit`'s box options for the first object's masks [F, H, W]: one box around the whole
    path, or the first and last frames' boxes."""
    if path:
        return {"mask_box": around(masks, margin)}
    return {"mask_box": around(masks[0], margin), "mask_box_end": around(masks[-1], margin)}


def passes(row: dict[str, Any]) -> bool:
    return row["area_ratio"] <= AREA_RATIO and row["centroid_px"] <= CENTROID_PX and row["color_share"] >= COLOR_SHARE


def edit_clip(spec: shapes.ClipSpec, masks: np.ndarray, common: dict[str, Any], steps: int, margin: int, keep: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One clip inverted once (guidance 1) and edited to the next color under every box setting."""
    name = clip_name(spec.seed)
    inv = engine.invert(f"{name}.mp4", common["model"], steps=steps, source_prompt=spec.caption, guidance=1.0, device=common["device"],
                        cache_dir=common["cache_dir"], compile=False, **INVERT)
    target = edit_targets(spec)["color"]
    truth = EditTruth(spec, target, masks)
    keep.setdefault(f"{name} source", inv.frames().numpy())
    rows = []
    for setting, how in SETTINGS.items():
        if setting not in common["settings"]:
            continue
        options = boxes(masks[0], how["path"], margin) | {k: v for k, v in how.items() if k != "path"}
        began = time.monotonic()
        frames = engine.edit(inv, [target.caption], output="frames", model=common["model"], cache_dir=common["cache_dir"], device=common["device"], compile=False,
                             **RECIPE, **options).frames[0]
        m = edit_measures(frames, truth)
        row = {"clip": name, "caption": spec.caption, "prompt": target.caption, "setting": setting, **options, "color_share": m["color_share"],
               **painted_region(frames, truth), "seconds": round(time.monotonic() - began, 1)}
        row["pass"] = passes(row)
        print(json.dumps(row), flush=True)
        rows.append(row)
        keep.setdefault(f"{name} {setting}", frames)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        if mine:
            finite = [r["centroid_px"] for r in mine if np.isfinite(r["centroid_px"])]
            out.append({"setting": setting, "clips": len(mine), "color_share": float(np.mean([r["color_share"] for r in mine])),
                        "area_ratio": float(np.median([r["area_ratio"] for r in mine])), "area_max": float(max(r["area_ratio"] for r in mine)),
                        "centroid_px": float(np.median(finite)) if finite else None, "centroid_max": float(max(r["centroid_px"] for r in mine)),
                        "area_ok": float(np.mean([r["area_ratio"] <= AREA_RATIO for r in mine])),
                        "centroid_ok": float(np.mean([r["centroid_px"] <= CENTROID_PX for r in mine])),
                        "pass_rate": float(np.mean([r["pass"] for r in mine]))})
    return out


COLUMNS = [("setting", "setting", ""), ("clips", "clips", "d"), ("object recolored", "color_share", ".3f"), ("area / object (median)", "area_ratio", ".2f"),
           ("area max", "area_max", ".2f"), (f"area <= {AREA_RATIO}x", "area_ok", ".0%"), ("centroid px (median)", "centroid_px", ".2f"),
           ("centroid max", "centroid_max", ".2f"), (f"centroid <= {CENTROID_PX:g} px", "centroid_ok", ".0%"), ("pass", "pass_rate", ".0%")]
CLIP_COLUMNS = [("clip", "clip", ""), ("setting", "setting", ""), ("box", "mask_box", ""), ("end box", "mask_box_end", ""), ("recolored", "color_share", ".3f"),
                ("area / object", "area_ratio", ".2f"), ("centroid px", "centroid_px", ".2f"), ("pass", "pass", "")]


def markdown(result: dict[str, Any]) -> str:
    parts = [
        "# Box edits on the shapes proxy",
        f"{result['device']}, torch {result['torch']}, {result['date']}, {result['seconds']} s. Command: `{result['command']}`. "
        "Every number is the shapes proxy's (a 7M-parameter CogVideoX trained on the shapes world), not CogVideoX-5B's.",
        result["setup"],
        table(result["summary"], COLUMNS),
        f"A clip passes with the target-colored area at most {AREA_RATIO}x the object's, the colored region's centroid within "
        f"{CENTROID_PX:g} px of the object's (mean over frames) and at least {COLOR_SHARE:.0%} of the object's pixels recolored; "
        f"the target is {CLIP_SHARE:.0%} of clips.",
        "## Every clip",
        table(result["rows"], CLIP_COLUMNS),
        "Frames 0, 5, 11, 16 of the first clips: [box_edits.png](box_edits.png).",
    ]
    return "\n\n".join(parts) + "\n"


def save(out: Path, result: dict[str, Any], keep: dict[str, np.ndarray]) -> None:
    result["summary"] = summarize(result["rows"])
    (out / "box_edits.json").write_text(json.dumps(result, indent=1))
    (out / "BOX_EDITS.md").write_text(markdown(result))
    shown = {k: torch.as_tensor(np.asarray(v)) for k, v in keep.items() if any(k.startswith(n) for n in result["grid_clips"])}
    if shown:
        grid_png(out / "box_edits.png", shown)


def served(specs: list[shapes.ClipSpec]) -> tuple[dict[str, torch.Tensor], dict[str, VideoInfo]]:
    frames, infos = {}, {}
    for spec in specs:
        name = clip_name(spec.seed)
        video, _ = shapes.render(spec)
        frames[name] = torch.from_numpy(video)
        infos[name] = VideoInfo(f"{name}.mp4", hashlib.sha256(video.tobytes()).hexdigest(), shapes.FRAMES, 8.0, shapes.WIDTH, shapes.HEIGHT)
    return frames, infos


def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = held_out_clips(args.clips, args.skip_clips)
    common = dict(model=str(args.model), device=args.device, cache_dir=str(args.cache or tempfile.mkdtemp(prefix="cogedit-box-")), settings=args.settings)
    result: dict[str, Any] = {
        "device": device_name(args.device or ("cuda" if torch.cuda.is_available() else "cpu")), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": shlex.join(["benchmarks/box_edits.py", *sys.argv[1:]]),
        "setup": (f"{len(specs)} held-out clips ({clip_name(specs[0].seed)} to {clip_name(specs[-1].seed)}), 17x96x144, inverted under their captions "
                  f"with {args.steps} steps and guidance 1, edited with {args.steps} steps to the next color (the color recipe: the source caption as "
                  f"the negative prompt, no injection) inside boxes around the object grown by {args.margin} px."),
        "steps": args.steps, "margin": args.margin, "rows": [], "grid_clips": [clip_name(s.seed) for s in specs[: args.grid]],
    }
    keep: dict[str, np.ndarray] = {}
    frames, infos = served(specs)
    with serving(frames, infos, INPUT):
        for spec in specs:
            result["rows"] += edit_clip(spec, shapes.render(spec)[1], common, args.steps, args.margin, keep)
            result["seconds"] = round(time.monotonic() - began, 1)
            save(out, result, keep)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the shapes proxy's folder (engine/assets/shapes)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default=None)
    ap.add_argument("--clips", type=int, default=10, help="held-out one-object clips")
    ap.add_argument("--skip-clips", type=int, default=0, help="leave out the first held-out clips (those the settings were tuned on)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--margin", type=int, default=4, help="px the box reaches beyond the object")
    ap.add_argument("--grid", type=int, default=2, help="clips shown in box_edits.png")
    ap.add_argument("--cache", type=Path, help="the cache folder (default: a new temporary one)")
    ap.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), metavar="SETTING", help=f"the box settings to run (default: all: {'; '.join(SETTINGS)})")
    args = ap.parse_args()
    print(markdown(run(args)))


if __name__ == "__main__":
    main()
