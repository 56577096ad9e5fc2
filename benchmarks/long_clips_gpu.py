"""A long clip on the full-size model: peak VRAM and time of a windowed run against one window.

    # on the GPU (one process; the random 5B weights are written once under --workdir):
    python benchmarks/long_clips_gpu.py --out $OUT/long_clips_gpu.json --steps 10
    # here, the harness on the CPU (tiny model, tiny sizes):
    python benchmarks/long_clips_gpu.py --out /tmp/lcg.json --tiny --steps 2

The full-size CogVideoX-5B architecture with random bf16 weights (benchmarks/bench.py's
`model_path`), the staged plan, no compile (compiling would time kernels, not windows). Two clips
of a synthetic video served from memory (no decoder needed): one window (49 frames at 480x720)
and a long clip (97 frames: 25 latent frames, three windows of 13 with the default overlap). Each
is inverted (no CFG, as the shapes benchmarks; `--invert-guidance` changes it) and edited once under one prompt
with `--steps` steps. Per call: wall clock, median step, the peak VRAM of each phase
(`engine.report`). The targets: the long clip's transformer peak within 5% of one window's, and
its steps within 1.1x of (windows x one window's); 50-step figures are derived from the median
step (the measured wall clock plus the missing steps x the median step), labelled so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from benchmarks.bench import model_path  # noqa: E402
from benchmarks.e2e import _timed_call  # noqa: E402
from engine.video.reader import VideoInfo  # noqa: E402

FULL = dict(height=480, width=720)
TINY = dict(height=96, width=160)
SCHEDULE = 50
PEAK_SLACK, TIME_SLACK = 1.05, 1.10


def synthetic(frames: int, height: int, width: int) -> np.ndarray:
    """uint8 [frames, H, W, 3]: a gradient with a bright square moving across (real motion, no file)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 90.0)], -1)
    video = np.repeat(base[None], frames, 0)
    side = height // 5
    for f in range(frames):
        left = int(f * (width - side) / max(frames - 1, 1))
        video[f, height // 2 - side // 2 : height // 2 + side // 2, left : left + side] = 240
    return video.round().astype(np.uint8)


def served(name: str, video: np.ndarray):
    """The engine reads `name` as `video`: the probe, the frame read and the file check."""
    info = VideoInfo(f"/served/{name}.mp4", f"{name}-{video.shape[0]}x{video.shape[1]}", video.shape[0], 8.0, video.shape[2], video.shape[1])

    def read(path, settings):
        return torch.from_numpy(video), info

    return (mock.patch("engine.workflow.probe_video", lambda path: info), mock.patch("engine.stages.encode.read_frames", read),
            mock.patch("engine.workflow.check_video_file", lambda path: None)), info.path


def timed(fn, reporter: engine.Reporter, cuda: bool) -> dict[str, Any]:
    """e2e.py's timing of one call, with each phase's peak in GiB and the 50-step wall clock derived."""
    out = _timed_call(fn, reporter, cuda)
    out["phases"] = {name: {"seconds": round(p["seconds"], 2), "peak_gib": (p["peak_bytes"] or 0) / 2**30} for name, p in out["phases"].items()}
    out["wall_at_50_s"] = out["wall_s"] + (SCHEDULE - out["steps"]) * out["median_step_s"]
    return out


def one_clip(frames: int, model: Path, size: dict, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    patches, path = served(f"long{frames}", synthetic(frames, **size))
    reporter = engine.Reporter(device="cuda" if cuda else "cpu")
    common = dict(cache_dir=Path(args.workdir) / "long-clips-cache", reporter=reporter, compile=False)
    inv: list = []
    with patches[0], patches[1], patches[2]:
        invert = timed(lambda cb: inv.append(engine.invert(path, model, frames=frames, steps=args.steps, guidance=args.invert_guidance, callback=cb, **size, **common)), reporter, cuda)
    edit = timed(lambda cb: engine.edit(inv[0], ["a watercolor painting"], output="frames", callback=cb, **common), reporter, cuda)
    windows = inv[0].entry.manifest["summary"].get("windows", [[0, (frames - 1) // 4 + 1]])
    return {"frames": frames, "windows": windows, "invert": invert, "edit": edit}


def verdict(one: dict[str, Any], long: dict[str, Any]) -> dict[str, Any]:
    n = len(long["windows"])
    out: dict[str, Any] = {"windows": n}
    for call in ("invert", "edit"):
        a, b = one[call], long[call]
        out[f"{call}_peak_ratio"] = b["phases"][call]["peak_gib"] / a["phases"][call]["peak_gib"]
        out[f"{call}_step_ratio"] = b["median_step_s"] / (n * a["median_step_s"])
        out[f"{call}_wall_at_50_ratio"] = b["wall_at_50_s"] / (n * a["wall_at_50_s"])
    whole = [max(p["peak_gib"] for p in r[c]["phases"].values()) for r in (one, long) for c in ("invert", "edit")]
    out["any_phase_peak_ratio"] = max(whole[2:]) / max(whole[:2])  # the VAE runs over the whole clip
    out["peak_met"] = all(out[f"{c}_peak_ratio"] <= PEAK_SLACK for c in ("invert", "edit"))
    out["time_met"] = all(out[f"{c}_step_ratio"] <= TIME_SLACK for c in ("invert", "edit"))
    return out


def report(path: Path, results_dir: Path) -> None:
    """A GPU run's JSON -> results_dir/long_clips_gpu.{json,md,png}: per call, peak and median step
    of one window against the long clip."""
    from benchmarks.plots import bar_chart

    data = json.loads(path.read_text())
    (results_dir / "long_clips_gpu.json").write_text(json.dumps(data, indent=1))
    one, long, v = data["one_window"], data["long"], data["verdict"]
    lines = [f"{data['device']}, torch {data['torch']}, `{data['command']}`: {data['size']['height']}x{data['size']['width']}, "
             f"{one['frames']} frames (one window) against {long['frames']} ({v['windows']} windows), {data['steps']} steps a call.", "",
             "| call | peak, one window | peak, long clip | ratio | median step, one window | median step, long clip | long / (windows x one) |",
             "|---|---|---|---|---|---|---|"]
    for call in ("invert", "edit"):
        a, b = one[call], long[call]
        lines.append(f"| {call} | {a['phases'][call]['peak_gib']:.2f} GiB | {b['phases'][call]['peak_gib']:.2f} GiB | {v[f'{call}_peak_ratio']:.4f} | "
                     f"{a['median_step_s']:.2f} s | {b['median_step_s']:.2f} s | {v[f'{call}_step_ratio']:.4f} |")
    lines += ["", f"Peak within 5%: {'met' if v['peak_met'] else 'not met'}; steps within 1.1x: {'met' if v['time_met'] else 'not met'}. "
              f"Wall clock at 50 steps (derived from the median step): edit {long['edit']['wall_at_50_s']:.0f} s against "
              f"{v['windows']} x {one['edit']['wall_at_50_s']:.0f} s ({v['edit_wall_at_50_ratio']:.2f}x)."]
    (results_dir / "long_clips_gpu.md").write_text("\n".join(lines) + "\n")
    labels = [f"{call} {clip}" for call in ("invert", "edit") for clip in ("1 window", f"{v['windows']} windows")]
    values = [r[call]["phases"][call]["peak_gib"] for call in ("invert", "edit") for r in (one, long)]
    bar_chart(labels, values, "peak GiB", f"{long['frames']} frames vs one window, {data['device']}", results_dir / "long_clips_gpu.png")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="the JSON to write (a run)")
    ap.add_argument("--report", type=Path, metavar="JSON", help="here: a GPU run's JSON -> benchmarks/results/long_clips_gpu.{json,md,png}")
    ap.add_argument("--steps", type=int, default=10, help="steps run per call (50-step figures are derived from the median step)")
    ap.add_argument("--frames", type=int, default=97)
    ap.add_argument("--invert-guidance", type=float, default=1.0)
    ap.add_argument("--tiny", action="store_true", help="the tiny model at tiny sizes: checks the harness on a CPU")
    ap.add_argument("--workdir", default="/tmp/cogedit-long")
    args = ap.parse_args()
    if args.report:
        return report(args.report, Path(__file__).with_name("results"))
    if not args.out:
        ap.error("--out is required for a run")
    cuda = torch.cuda.is_available()
    model = model_path(Path(args.workdir), args.tiny)
    shutil.rmtree(Path(args.workdir) / "long-clips-cache", ignore_errors=True)  # every call inverts: no hit from an earlier run
    size = TINY if args.tiny else FULL
    window = engine.inspect_model(model).latent_window * 4 - 3
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__, "steps": args.steps,
                              "command": "python benchmarks/long_clips_gpu.py " + " ".join(sys.argv[1:]), "size": size}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name, frames in (("one_window", window), ("long", args.frames)):
        result[name] = one_clip(frames, model, size, args, cuda)
        args.out.write_text(json.dumps(result, indent=1))
        print(name, json.dumps(result[name])[:800], flush=True)
    result["verdict"] = verdict(result["one_window"], result["long"])
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["verdict"], indent=1))


if __name__ == "__main__":
    main()
