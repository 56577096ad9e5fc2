"""Edit settings chosen by measurement, on the shapes proxy and held-out shapes clips (issue 18).

    python benchmarks/shapes_quality.py --model SHAPES_PROXY_DIR --out $OUT --device cuda
    python benchmarks/shapes_quality.py --model SHAPES_PROXY_DIR --out /tmp/q --device cpu --quick
    # the settings chosen on the first 10 clips, measured on the next 30, joined into the first run's SHAPES.md
    python benchmarks/shapes_quality.py --model SHAPES_PROXY_DIR --out $OUT/c --skip-clips 10 --clips 30 --only "A;B"
    python benchmarks/shapes_quality.py --report $OUT/shapes_quality.json --confirm $OUT/c/shapes_quality.json
    # what a lossy attention kernel costs: the same clips and setting, inverted and edited with it
    python benchmarks/shapes_quality.py --model SHAPES_PROXY_DIR --out $OUT/sage --device cuda --attention sage --only "default (window 0:1, all layers, strength 1, CFG 6, DDIM)"

Held-out clips (engine/video/shapes.py, split "heldout": one object whose color x shape pair the
proxy never saw) are served to `engine.invert` from memory (no video file, no decoder), inverted
under their captions (DDIM or fixed point, 50 steps, CFG 6 as the engine's defaults, or without
CFG), then edited through `engine.edit` towards three one-attribute changes of their caption
(color, shape, background) and the caption itself (the reconstruction), under one setting at a
time changed from upstream's defaults: injection window, layers, strength, edit guidance,
inversion method, negative-prompt inversion, and a mask around the object (the object drawn
larger, or a box). benchmarks/shape_measures.py judges every edit exactly. Each clip is also
round-tripped (verify, no CFG) with DDIM and fixed point.

Where the time goes (profiled on the CPU, --quick, 2 clips, 5 steps: 112 s): the VAE's decoding
(43%, a CPU cost), then garbage collections, 108 of 0.2 s each (21%): the engine collects around
every model load, and each collection walks the ~400k objects of the imported libraries. So the
work runs in `--workers` processes sharing the device, each with those objects frozen out of the
collector (`gc.freeze`), one task per inversion, per round trip and per (setting, clip); every
setting's edits start from the same cached inversions (one per clip and method). Writes into
--out, after every setting (a run cut short keeps what it finished; no task starts after
--minutes, and a setting missing any clip is listed as not run):

    shapes_quality.json   every clip's measures, the per-setting summaries, the round trips
    SHAPES.md             the tables, the best setting per edit kind, the targets met or not
    shapes_grid.png       two clips: source, reconstruction, each edit, the masked color edit
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from benchmarks.quality import device_name, grid_png, serving, table  # noqa: E402
from benchmarks.shape_measures import EDGE, EditTruth, dilate, edit_measures, psnr_outside  # noqa: E402
from engine.stages.verify import psnr_db  # noqa: E402
from engine.video import shapes  # noqa: E402
from engine.video.reader import FrameSettings, VideoInfo  # noqa: E402

# fp32: rounding stays out of the comparisons (edits run in their inversion's dtype)
INVERT = dict(frames=shapes.FRAMES, height=shapes.HEIGHT, width=shapes.WIDTH, dtype="fp32")
INPUT = FrameSettings(max_frames=shapes.FRAMES, height=shapes.HEIGHT, width=shapes.WIDTH)
KINDS = ("color", "shape", "background")
MASK_MARGIN = 4  # px around the object that a mask "around the object" adds
# Issue 18's targets (on the best setting of each kind).
TARGETS = {"color": ("color_share", 0.8, 0.9), "shape": ("shape_iou", 0.6, 0.75), "background": ("background_share", 0.8, None)}
TARGET_CENTROID_PX = 3.0
KEPT_SIZE = 1.5  # an edit keeps the object's size when its area is within this factor of the source's
TARGET_PSNR_MASKED = 30.0
TARGET_ROUND_TRIP_CUT = 4.0


def clip_name(seed: int) -> str:
    return f"shapes_heldout_{seed:03d}"


def held_out_clips(count: int, skip: int = 0) -> list[shapes.ClipSpec]:
    """`count` one-object clips of the held-out split, after its first `skip`."""
    return [shapes.clip_spec(seed, "heldout") for seed in shapes.one_object_seeds(skip + count, "heldout")[skip:]]


def edit_targets(spec: shapes.ClipSpec) -> dict[str, shapes.ClipSpec]:
    """One change per kind, the same rule for every clip: the next color; a triangle, or a square
    from a triangle (the pairs whose unedited IoU stays under 0.6; circle vs square is 0.79); the
    next background."""
    thing = spec.things[0]
    colors, backgrounds = list(shapes.COLORS), list(shapes.BACKGROUNDS)
    return {
        "color": shapes.with_change(spec, color=colors[(colors.index(thing.color) + 1) % len(colors)]),
        "shape": shapes.with_change(spec, shape="square" if thing.shape == "triangle" else "triangle"),
        "background": shapes.with_change(spec, background=backgrounds[(backgrounds.index(spec.background) + 1) % len(backgrounds)]),
    }


# The inversions a setting can start from: `engine.invert` options beside the caption and the defaults.
FIXED_POINT = {"inversion": "fixed-point"}
# Negative-prompt inversion (Miyake et al. 2023): invert without CFG, then edit with the source caption
# as the negative prompt, so that the edit under the source caption is the plain round trip and CFG
# pushes only along what the prompt changes.
NO_CFG = {"guidance": 1.0}
NEGATIVE_PROMPT_INVERSION = {"invert": NO_CFG, "negative": "source"}
NPI = "NPI"  # the frames' label of a negative-prompt inversion's edits
SHOWN = ("ddim", NPI)  # the inversions whose edits the grid shows (the first setting of each)


def conditions(num_layers: int, quick: bool) -> dict[str, dict[str, Any]]:
    """Each setting's `engine.edit` options, one change at a time from upstream's defaults
    ("invert" picks the inversion's options, "mask" adds a mask around the object: "object", the
    object drawn larger, or "box", a square that any shape there fits in; "negative": "source"
    makes the source caption the edit's negative prompt)."""
    half = num_layers // 2
    grid = {
        "default (window 0:1, all layers, strength 1, CFG 6, DDIM)": {},
        "mask around the object": {"mask": "object"},
        "fixed-point inversion": {"invert": FIXED_POINT},
        "fixed-point inversion + mask": {"invert": FIXED_POINT, "mask": "object"},
        **{f"window 0:{w}": {"inject_steps": f"0:{w}"} for w in (0.8, 0.6, 0.4, 0.2)},
        "no injection": {"inject_strength": 0.0},
        "strength 0.5": {"inject_strength": 0.5},
        f"layers 0-{half - 1}": {"inject_layers": f"0-{half - 1}"},
        f"layers {half}-{num_layers - 1}": {"inject_layers": f"{half}-{num_layers - 1}"},
        "CFG 3": {"guidance": 3.0},
        "CFG 9": {"guidance": 9.0},
        "window 0:0.6 + mask": {"inject_steps": "0:0.6", "mask": "object"},
        # inside the mask the prompt alone draws the object; outside, the inversion's latents keep the rest
        "mask, no injection": {"inject_strength": 0.0, "mask": "object"},
        "box mask, no injection": {"inject_strength": 0.0, "mask": "box"},
        "negative-prompt inversion": NEGATIVE_PROMPT_INVERSION,
        "negative-prompt inversion + mask, no injection": {**NEGATIVE_PROMPT_INVERSION, "inject_strength": 0.0, "mask": "object"},
        "negative-prompt inversion + box mask, no injection": {**NEGATIVE_PROMPT_INVERSION, "inject_strength": 0.0, "mask": "box"},
        "negative-prompt inversion + window 0:0.6": {**NEGATIVE_PROMPT_INVERSION, "inject_steps": "0:0.6"},
        "negative-prompt inversion + window 0:0.4": {**NEGATIVE_PROMPT_INVERSION, "inject_steps": "0:0.4"},
        "negative-prompt inversion + strength 0.5": {**NEGATIVE_PROMPT_INVERSION, "inject_strength": 0.5},
        "negative-prompt inversion + CFG 9": {**NEGATIVE_PROMPT_INVERSION, "guidance": 9.0},
        "negative-prompt inversion + box mask": {**NEGATIVE_PROMPT_INVERSION, "mask": "box"},
        "negative-prompt fixed-point inversion": {"invert": {**NO_CFG, **FIXED_POINT}, "negative": "source"},
        "negative-prompt fixed-point inversion + box mask": {"invert": {**NO_CFG, **FIXED_POINT}, "negative": "source", "mask": "box"},
        "negative-prompt inversion + window 0:0.8": {**NEGATIVE_PROMPT_INVERSION, "inject_steps": "0:0.8"},
        f"negative-prompt inversion + layers 0-{half - 1}": {**NEGATIVE_PROMPT_INVERSION, "inject_layers": f"0-{half - 1}"},
        f"negative-prompt inversion + layers {half}-{num_layers - 1}": {**NEGATIVE_PROMPT_INVERSION, "inject_layers": f"{half}-{num_layers - 1}"},
    }
    return dict(list(grid.items())[:3]) if quick else grid


def served(specs: list[shapes.ClipSpec]) -> tuple[dict[str, torch.Tensor], dict[str, VideoInfo], dict[str, np.ndarray]]:
    """Frames, video facts and masks of each clip, by name; the frames' hash stands in for the file's."""
    frames, infos, masks = {}, {}, {}
    for spec in specs:
        name = clip_name(spec.seed)
        video, mask = shapes.render(spec)
        frames[name], masks[name] = torch.from_numpy(video), mask
        sha = hashlib.sha256(video.tobytes()).hexdigest()
        infos[name] = VideoInfo(f"{name}.mp4", sha, shapes.FRAMES, 8.0, shapes.WIDTH, shapes.HEIGHT)
    return frames, infos, masks


def edit_clip(inv: Any, spec: shapes.ClipSpec, masks: np.ndarray, options: dict[str, Any], common: dict[str, Any], keep: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One clip edited under one setting: a row for its reconstruction and one per kind; frames worth
    showing go into `keep`."""
    options = dict(options)
    masked = options.pop("mask", None)
    method = inversion_label(options.pop("invert", {}))
    if options.pop("negative", None) == "source":
        options["negative_prompt"] = spec.caption
        method = NPI
    name = clip_name(spec.seed)
    targets = edit_targets(spec)
    kinds = [k for k in KINDS if not (masked and k == "background")]  # a mask around the object keeps the background
    extra = {"mask": shapes.around(spec, MASK_MARGIN, box=masked == "box")} if masked else {}
    out = engine.edit(inv, [spec.caption, *(targets[k].caption for k in kinds)], output="frames", **options, **extra, **common)
    reconstruction, source = out.frames[0], inv.frames().numpy()
    keep.setdefault(f"{name} reconstruction ({method})", reconstruction)
    rows = [{"clip": name, "kind": "reconstruction", "psnr_source_db": psnr_db(torch.as_tensor(reconstruction), torch.as_tensor(source))}]
    rim = dilate(masks.any(0), EDGE)
    for kind, frames in zip(kinds, out.frames[1:], strict=True):
        truth = EditTruth(spec, targets[kind], masks)
        m = edit_measures(frames, truth, reconstruction)
        m["psnr_outside_source_db"] = psnr_outside(frames, source, rim)
        if masked:  # the measure for local edits: outside the mask itself
            m["psnr_outside_mask_db"] = psnr_outside(frames, reconstruction, extra["mask"])
        rows.append({"clip": name, "kind": kind, "prompt": targets[kind].caption, **m})
        keep.setdefault(f"{name} {kind}{' masked' if masked else ''} ({method})", frames)
    return rows


# ---------------------------------------------------------------- worker processes

_WORKER: dict[str, Any] = {}  # a worker's clips by name (specs, masks) and its serving patches (set by worker_init)


def worker_init(seeds: list[int]) -> None:
    """A worker: one torch thread, the held-out clips served from memory for its whole life, and the
    imported libraries' objects frozen out of the garbage collector (the engine collects around every
    model load: 0.2 s a collection otherwise)."""
    torch.set_num_threads(1)
    specs = [shapes.clip_spec(seed, "heldout") for seed in seeds]
    frames, infos, masks = served(specs)
    patches = serving(frames, infos, INPUT)
    patches.__enter__()  # never left: the process ends with the pool (kept in _WORKER, or collecting it would undo them)
    _WORKER.update(specs={clip_name(s.seed): s for s in specs}, masks=masks, serving=patches)
    gc.freeze()


def inversion_label(options: dict[str, Any]) -> str:
    """A short name of an inversion's options, for the frames shown."""
    return ", ".join(f"{k} {v}" for k, v in sorted(options.items())) or "ddim"


def inversion(name: str, steps: int, common: dict[str, Any], **options: Any) -> Any:
    """The clip's inversion under its caption with `options` (from the cache once inverted)."""
    spec = _WORKER["specs"][name]
    return engine.invert(f"{name}.mp4", common["model"], steps=steps, source_prompt=spec.caption, device=common["device"],
                         cache_dir=common["cache_dir"], compile=False, attention=common["attention"], **INVERT, **options)


def invert_task(name: str, options: dict[str, Any], steps: int, common: dict[str, Any]) -> None:
    inversion(name, steps, common, **options)


def setting_task(options: dict[str, Any], name: str, steps: int, common: dict[str, Any], deadline: float) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]] | None:
    """One (setting, clip): its rows and frames worth showing; None when it would start after `deadline` (time.time())."""
    if time.time() > deadline:
        return None
    keep: dict[str, np.ndarray] = {}
    inv = inversion(name, steps, common, **options.get("invert", {}))
    return edit_clip(inv, _WORKER["specs"][name], _WORKER["masks"][name], options, common, keep), keep


def round_trip_task(name: str, steps: int, common: dict[str, Any]) -> dict[str, Any]:
    """DDIM against fixed point (1 refinement, the default, and 3), verify under the caption without CFG."""
    methods = {"ddim": {}, "fixed_point": FIXED_POINT, "fixed_point_x3": {**FIXED_POINT, "inversion_iters": 3}}
    row: dict[str, Any] = {"clip": name}
    for key, options in methods.items():
        inv = inversion(name, steps, common, **NO_CFG, verify=True, **options)
        row[key], row[f"{key}_psnr_db"] = inv.verify["latent_rel_error"], inv.verify["psnr_db"]
    row["cut"], row["cut_x3"] = row["ddim"] / row["fixed_point"], row["ddim"] / row["fixed_point_x3"]
    print("round trip", row, flush=True)
    return row


def finished(outcomes: list[tuple[list[dict[str, Any]], dict[str, np.ndarray]] | None]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]] | None:
    """A setting's rows and frames over its clips' task outcomes; None when any clip did not run."""
    if any(o is None for o in outcomes):
        return None
    keep: dict[str, np.ndarray] = {}
    for _, frames in outcomes:
        keep.update(frames)
    return [row for rows, _ in outcomes for row in rows], keep


def summarize(name: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per kind: mean measures and the share of clips meeting the issue's adherence bar."""
    out = []
    for kind in KINDS:
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        key, bar, _ = TARGETS[kind]
        finite = [r["centroid_error_px"] for r in mine if np.isfinite(r["centroid_error_px"])]
        out.append({
            "setting": name, "kind": kind, "clips": len(mine), "adherence": float(np.mean([r[key] for r in mine])),
            "pass_rate": float(np.mean([r[key] >= bar for r in mine])),
            # A clip whose object is not found on some frame has no track: counted apart, not averaged as inf.
            "centroid_error_px": float(np.mean(finite)) if finite else None,
            "lost": len(mine) - len(finite),
            "size_ratio": float(np.mean([r["size_ratio"] for r in mine])),
            "psnr_outside_db": float(np.mean([r["psnr_outside_db"] for r in mine])),
            "psnr_outside_source_db": float(np.mean([r["psnr_outside_source_db"] for r in mine])),
            "psnr_outside_mask_db": float(np.mean([r["psnr_outside_mask_db"] for r in mine])) if "psnr_outside_mask_db" in mine[0] else None,
            "source_color_share": float(np.mean([r["source_color_share"] for r in mine])) if kind == "color" else None,
        })
    return out


def summaries(rows: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """`summarize` over every setting's rows, in the settings' order."""
    return [row for setting, mine in rows.items() for row in summarize(setting, mine)]


def keeps_structure(row: dict[str, Any]) -> bool:
    """The edited object is found on every frame of every clip and, unless its shape was the edit,
    keeps its size within KEPT_SIZE (a color edit that paints its whole mask fails)."""
    return row["lost"] == 0 and (row["kind"] == "shape" or 1 / KEPT_SIZE <= row["size_ratio"] <= KEPT_SIZE)


def best(summary: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kind, the setting with the highest pass rate among those that keep the object's structure
    (`keeps_structure`; all settings when none does), then adherence, then the smaller centroid error."""
    out = {}
    for kind in KINDS:
        rows = [r for r in summary if r["kind"] == kind]
        if rows:
            out[kind] = max(rows, key=lambda r: (keeps_structure(r), r["pass_rate"], r["adherence"], -(r["centroid_error_px"] if r["centroid_error_px"] is not None else np.inf)))
    return out


def verdict(target: str, setting: str, measured: str, met: bool) -> dict[str, Any]:
    return {"target": target, "setting": setting, "measured": measured, "met": bool(met)}


def choices(summary: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """The settings the targets are judged on, per kind: the best ("best"), and for a mask's targets
    the best with a mask ("masked") and the best without ("unmasked")."""
    groups = {"best": summary, "masked": [r for r in summary if r["psnr_outside_mask_db"] is not None],
              "unmasked": [r for r in summary if r["psnr_outside_mask_db"] is None]}
    return {group: {kind: r["setting"] for kind, r in best(rows).items()} for group, rows in groups.items()}


def verdicts(summary: list[dict[str, Any]], round_trips: list[dict[str, Any]], steps: int, settings: dict[str, dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """Issue 18's targets against what was measured, for `choices(summary)` or, on other clips, for
    the `settings` chosen on the first ones (a target whose setting did not run there is left out)."""
    settings = settings or choices(summary)
    row = {(r["kind"], r["setting"]): r for r in summary}
    chosen, masked, unmasked = ({kind: row[kind, name] for kind, name in settings[group].items() if (kind, name) in row} for group in ("best", "masked", "unmasked"))
    out = []
    for kind, (key, bar, share) in TARGETS.items():
        if kind in chosen and share is not None:
            r = chosen[kind]
            out.append(verdict(f"{kind}: {key} >= {bar} on >= {share:.0%} of clips", r["setting"], f"{r['pass_rate']:.0%}", r["pass_rate"] >= share))
    if "color" in chosen:
        r = chosen["color"]
        c = r["centroid_error_px"]
        measured = ("-" if c is None else f"{c:.2f} px") + (f", object lost on some frame in {r['lost']} of {r['clips']} clips" if r["lost"] else "")
        out.append(verdict(f"color: centroid error <= {TARGET_CENTROID_PX} px", r["setting"], measured, r["lost"] == 0 and c <= TARGET_CENTROID_PX))
    # A mask's targets, per kind: the best masked setting against the best one without a mask.
    for kind in [k for k in KINDS if k in masked and k in unmasked]:
        r, p = masked[kind], unmasked[kind]
        psnr = r["psnr_outside_mask_db"]
        out.append(verdict(f"{kind} with a mask: PSNR outside the mask >= {TARGET_PSNR_MASKED} dB", r["setting"], f"{psnr:.1f} dB", psnr >= TARGET_PSNR_MASKED))
        # both near 0: the edit failed either way, and "no worse" would pass on nothing
        judged = max(r["adherence"], p["adherence"]) > 0.01
        out.append(verdict(f"{kind} with a mask: adherence no worse than without ({p['setting']})", r["setting"], f"{r['adherence']:.3f} vs {p['adherence']:.3f}",
                           judged and r["adherence"] >= p["adherence"] - 0.01))
    for key, label in (("cut", "fixed point x1 (default)"), ("cut_x3", "fixed point x3")):
        if round_trips:
            cut = float(np.mean([r[key] for r in round_trips]))
            target = f"fixed-point round trip >= {TARGET_ROUND_TRIP_CUT}x better than DDIM at {steps} steps (target: at 50)"
            out.append(verdict(target, label, f"{cut:.2f}x (mean over clips)", cut >= TARGET_ROUND_TRIP_CUT))
    return out


SUMMARY_COLUMNS = [("setting", "setting", ""), ("kind", "kind", ""), ("clips", "clips", "d"), ("adherence", "adherence", ".3f"),
                   ("pass", "pass_rate", ".0%"), ("centroid px", "centroid_error_px", ".2f"), ("lost", "lost", "d"), ("size", "size_ratio", ".2f"),
                   ("PSNR outside dB", "psnr_outside_db", ".1f"), ("vs source dB", "psnr_outside_source_db", ".1f"),
                   ("outside the mask dB", "psnr_outside_mask_db", ".1f"), ("kept source color", "source_color_share", ".3f")]
VERDICT_COLUMNS = [("target", "target", ""), ("setting", "setting", ""), ("measured", "measured", ""), ("met", "met", "")]


def _provenance(run: dict[str, Any]) -> dict[str, Any]:
    return {k: run[k] for k in ("device", "torch", "date", "command")}


def markdown(result: dict[str, Any]) -> str:
    proxy = result["proxy"]
    chosen = best(result["summary"])
    parts = [
        "# Edit settings on the shapes proxy (issue 18)",
        f"{result['device']}, torch {result['torch']}, {result['date']}. Command: `{result['command']}`. Every number here is the "
        f"**shapes proxy's** ({proxy['what']}; {proxy['params_total'] / 1e6:.1f}M parameters, held-out v-loss {proxy['heldout_v_loss']:.3f} "
        f"against {proxy['random_tiny_v_loss']:.3f} for the random tiny model), not CogVideoX-5B's.",
        result["setup"],
        "## Per setting and edit kind",
        "adherence: color = share of the object's pixels nearest the target color; shape = IoU with the target shape on the "
        "source's path; background = share of the pixels outside the object nearest the target background. pass = share of "
        "clips with color >= 0.8, IoU >= 0.6, background >= 0.8. centroid: the object's track against the source's (px), mean over the clips "
        "where it is found on every frame; lost: clips where it is not. "
        "PSNR outside: outside the object (and a 2 px rim) against the same setting's reconstruction (source caption); "
        "vs source: against the source frames; outside the mask: masked settings only, outside the mask, against the reconstruction. "
        "kept source color: color edits only, the share of the object's pixels still nearest the source's color.",
        table(result["summary"], SUMMARY_COLUMNS),
        "## Best setting per kind (on this proxy)",
        table(list(chosen.values()), [("kind", "kind", ""), ("setting", "setting", ""), ("adherence", "adherence", ".3f"), ("pass", "pass_rate", ".0%"),
              ("centroid px", "centroid_error_px", ".2f"), ("lost", "lost", "d"), ("PSNR outside dB", "psnr_outside_db", ".1f")]),
        "## Round trip (verify, source caption, no CFG)",
        "Latent error = ||x0' - x0|| / ||x0|| after inverting and denoising back; cut = DDIM's error / fixed point's "
        "(x1: one refinement per step, the default, 3 transformer forwards; x3: three).",
        table(result.get("round_trip", []), [("clip", "clip", ""), ("DDIM latent error", "ddim", ".4f"), ("fixed point x1", "fixed_point", ".4f"),
              ("x3", "fixed_point_x3", ".4f"), ("cut x1", "cut", ".2f"), ("cut x3", "cut_x3", ".2f"), ("DDIM PSNR dB", "ddim_psnr_db", ".2f"),
              ("x1 PSNR dB", "fixed_point_psnr_db", ".2f"), ("x3 PSNR dB", "fixed_point_x3_psnr_db", ".2f")]),
        "## Targets",
        table(verdicts(result["summary"], result.get("round_trip", []), result["steps"]), VERDICT_COLUMNS),
        *([f"Not run (out of time): {', '.join(result['not_run'])}."] if result.get("not_run") else []),
        *[f"Joined from another run on the same clips ({a['device']}, torch {a['torch']}, {a['date']}, `{a['command']}`): {'; '.join(a['settings'])}."
          for a in result.get("added", [])],
        "Two clips, frames 0, 5, 11, 16 (ddim: the default inversion; NPI: negative-prompt inversion; each the first setting of its kind): [shapes_grid.png](shapes_grid.png).",
        *[part for c in result.get("confirmations", []) for part in (
            "## Confirmed on other held-out clips",
            f"The best setting per kind above was chosen on the same clips it was measured on; this run measures those settings on clips "
            f"none of them was chosen on ({c['device']}, torch {c['torch']}, {c['date']}, `{c['command']}`). {c['setup']}",
            table(c["summary"], SUMMARY_COLUMNS),
            table(c["verdicts"], VERDICT_COLUMNS),
            f"Over both sets of clips ({len(result['clips'])} above and these), the settings run on both:",
            table(c["pooled"], SUMMARY_COLUMNS))],
    ]
    return "\n\n".join(parts) + "\n"


def save(out: Path, result: dict[str, Any], keep: dict[str, np.ndarray]) -> None:
    (out / "shapes_quality.json").write_text(json.dumps(result, indent=1))
    (out / "SHAPES.md").write_text(markdown(result))
    shown = [n for n in keep if any(n.startswith(clip_name(seed)) for seed in result["grid_clips"]) and ("(" not in n or n.endswith(tuple(f"({m})" for m in SHOWN)))]
    if shown:
        grid_png(out / "shapes_grid.png", {n: torch.as_tensor(np.asarray(keep[n])) for n in shown})


def run(args: argparse.Namespace) -> None:
    began = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = held_out_clips(args.clips, args.skip_clips)
    steps = args.steps
    # eager: no compile time (a tiny model gains nothing from it)
    common = dict(model=str(args.model), device=args.device, cache_dir=tempfile.mkdtemp(prefix="cogedit-shapes-"), compile=False, attention=args.attention)
    training = json.loads((Path(args.model) / "TRAINING.json").read_text())
    result: dict[str, Any] = {
        "device": device_name(args.device or ("cuda" if torch.cuda.is_available() else "cpu")), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": " ".join(["benchmarks/shapes_quality.py", *sys.argv[1:]]),
        "proxy": {"what": training["what"], "params_total": training["params_total"], "heldout_v_loss": training.get("heldout_v_loss", {}).get("proxy", float("nan")),
                  "random_tiny_v_loss": training.get("heldout_v_loss", {}).get("random_tiny", float("nan"))},
        "setup": (f"{len(specs)} held-out clips ({clip_name(specs[0].seed)} to {clip_name(specs[-1].seed)}: split 'heldout', one object each, "
                  "its color x shape pair never in training), 17x96x144, "
                  f"inverted under their captions with {steps} steps and CFG 6 (the engine's defaults; the negative-prompt inversion settings "
                  f"invert without CFG and edit with the source caption as the negative prompt), edited with {steps} steps towards "
                  "the next color, a triangle (a square from a triangle) and the next background, one setting changed at a time. "
                  f"Masks, per frame: the object drawn {MASK_MARGIN} px larger, or (box) a square {MASK_MARGIN} px larger than any shape of "
                  f"the object's size at its place. Attention kernel: {args.attention}."),
        "steps": steps,
        "attention": args.attention,
        "clips": [{"name": clip_name(s.seed), "caption": s.caption} for s in specs],
        "grid_clips": [s.seed for s in specs[:2]],
        "rows": {}, "summary": [],
    }
    names = [clip_name(s.seed) for s in specs]
    grid = conditions(engine.inspect_model(args.model).transformer_config["num_layers"], args.quick)
    if args.only:
        wanted = [name.strip() for name in args.only.split(";")]
        unknown = [name for name in wanted if name not in grid]
        if unknown:
            raise SystemExit(f"--only: no setting {unknown}; the settings are: {'; '.join(grid)}")
        grid = {name: grid[name] for name in wanted}
    deadline = time.time() + args.minutes * 60 - (time.monotonic() - began)
    keep: dict[str, np.ndarray] = {f"{clip_name(spec.seed)} source": shapes.render(spec)[0] for spec in specs[:2]}
    # spawn: a forked child must not touch CUDA; the workers import the engine themselves
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"), initializer=worker_init, initargs=([s.seed for s in specs],)) as pool:
        # 1. one inversion per clip and method, shared by every setting (the round trips run beside them)
        methods = {inversion_label(o.get("invert", {})): o.get("invert", {}) for o in grid.values()}
        inversions = [pool.submit(invert_task, name, method, steps, common) for method in methods.values() for name in names]
        trips = [pool.submit(round_trip_task, name, steps, common) for name in names[: args.round_trips]]
        for done in inversions:
            done.result()
        # 2. every (setting, clip), settings in order; a setting is summarized once all its clips are in
        tasks = {(setting, name): pool.submit(setting_task, options, name, steps, common, deadline) for setting, options in grid.items() for name in names}
        result["round_trip"] = [t.result() for t in trips]
        save(out, result, keep)
        result["not_run"] = []
        for setting in grid:
            outcome = finished([tasks[setting, name].result() for name in names])
            if outcome is None:
                print(f"out of time before all of {setting!r}", flush=True)
                result["not_run"].append(setting)
                continue
            rows, frames = outcome
            for k, v in frames.items():
                keep.setdefault(k, v)
            result["rows"][setting] = rows
            result["summary"] += summarize(setting, rows)
            done_kinds = [f"{r['kind']} {r['adherence']:.3f} pass {r['pass_rate']:.0%}" for r in result["summary"] if r["setting"] == setting]
            print(f"{setting}: done at {time.monotonic() - began:.0f} s", *done_kinds, flush=True)
            save(out, result, keep)
    result["seconds"] = round(time.monotonic() - began, 1)
    save(out, result, keep)
    print(markdown(result))


def report(path: Path, added: list[Path], confirm: list[Path] = ()) -> None:
    """Summaries, targets and SHAPES.md again from a run's per-clip rows (its grid stays as drawn),
    with the settings of other runs on the same clips (`added`, e.g. `--only` runs) joined in and
    named, and runs on other clips (`confirm`) checking the best settings chosen here."""
    result = json.loads(path.read_text())
    for extra in added:
        run = json.loads(extra.read_text())
        result["rows"].update(run["rows"])
        result.setdefault("added", []).append(_provenance(run) | {"settings": list(run["rows"])})
    result["summary"] = summaries(result["rows"])
    chosen = choices(result["summary"])
    if confirm:  # the confirmations given replace earlier ones (they are judged against this table's choice)
        result["confirmations"] = []
    for other in confirm:
        run = json.loads(other.read_text())
        summary = summaries(run["rows"])
        # the settings run on both sets of clips, over all of them
        pooled = [row for setting in run["rows"] if setting in result["rows"] for row in summarize(setting, result["rows"][setting] + run["rows"][setting])]
        result.setdefault("confirmations", []).append(_provenance(run) | {
            "setup": run["setup"], "summary": summary, "verdicts": verdicts(summary, [], run["steps"], chosen), "pooled": pooled})
    path.write_text(json.dumps(result, indent=1))
    (path.parent / "SHAPES.md").write_text(markdown(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", type=Path, help="a run's shapes_quality.json: summarize its rows again and rewrite SHAPES.md beside it")
    ap.add_argument("--add", type=Path, action="append", default=[], help="with --report: a later run's JSON whose settings join the table (repeatable)")
    ap.add_argument("--only", help="run only these settings, separated by ';' (their names as in the table)")
    ap.add_argument("--model", type=Path, help="the shapes proxy's folder")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default=None)
    ap.add_argument("--clips", type=int, default=10, help="held-out clips")
    ap.add_argument("--skip-clips", type=int, default=0, help="leave out the first held-out clips (to confirm settings on clips they were not chosen on)")
    ap.add_argument("--confirm", type=Path, action="append", default=[], help="with --report: a run on other clips (--skip-clips) that checks the best settings (repeatable)")
    ap.add_argument("--round-trips", type=int, default=6, help="of those, round-tripped with DDIM and fixed point")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=7.5, help="no (setting, clip) starts after this")
    ap.add_argument("--workers", type=int, default=8, help="processes sharing the device (each holds its own CUDA context)")
    ap.add_argument("--quick", action="store_true", help="three settings: a small grid to try it out")
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "fa4", "sage"], help="the attention kernel of every inversion and edit")
    args = ap.parse_args()
    if args.report:
        report(args.report, args.add, args.confirm)
    elif args.model and args.out:
        run(args)
    else:
        ap.error("pass --model and --out (measure), or --report JSON")


if __name__ == "__main__":
    main()
