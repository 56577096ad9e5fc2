"""Quality on the trained proxy (issue 11, item 4): how exactly DDIM and fixed-point inversion
round-trip a clip, and what reference K/V injection does to an edit's structure and adherence.

    python benchmarks/quality.py frames --out frames.safetensors      # decode the clips (needs decord)
    python benchmarks/quality.py run --out benchmarks/results          # everything, on this machine
    python benchmarks/quality.py run --quick --out /tmp/q              # a tiny grid, to try it out
    python benchmarks/quality.py run --device cuda --frames-file frames.safetensors --dtypes bf16,fp32 --fp8 --compile --out DIR

`run` writes quality.json, QUALITY.md and quality_grid.png into --out, quality.json after every
section (a run cut short keeps what it finished). Round trip: `engine.invert(..., verify=True)`
under the clip's caption with guidance 1 (no CFG: the verify pass denoises without it, so the round
trip compares like with like), on a training clip and the held-out clip. Edits: the held-out clip
inverted once with the engine's defaults (DDIM, 50 steps, CFG 6), then edited towards
bunny_burrow's caption under each condition; structure and adherence come from
`benchmarks/frame_measures.py`. `--frames-file` serves the clips from `frames` output on a machine
without decord: same frames, same file hashes, so the same cache ids and results.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from benchmarks.frame_measures import ClipClassifier, fit_classifier, ssim  # noqa: E402
from engine.models.proxy import PROXY_DIR, PROXY_FRAMES, PROXY_HEIGHT, PROXY_WIDTH  # noqa: E402
from engine.stages.verify import psnr_db  # noqa: E402
from engine.video.clips import CLIPS, HELD_OUT  # noqa: E402
from engine.video.reader import FrameSettings, VideoInfo, check_video_file, probe_video, read_frames  # noqa: E402

SIZE = dict(frames=PROXY_FRAMES, height=PROXY_HEIGHT, width=PROXY_WIDTH)
INPUT = FrameSettings(max_frames=PROXY_FRAMES, height=PROXY_HEIGHT, width=PROXY_WIDTH)
TRAINED = next(c for c in CLIPS if c.name == "bunny_stretch")  # the training clip the held-out one continues
TARGET = next(c for c in CLIPS if c.name == "bunny_burrow")  # the edit's target: another action
TRAINING = tuple(c for c in CLIPS if not c.held_out)
METHODS = {"ddim": {}, **{f"fixed-point x{k}": dict(inversion="fixed-point", inversion_iters=k) for k in (1, 2, 3)}}
# Issue 11's targets: round-trip latent error cut >= 3x at 50 steps, >= 5x at 10, <= 3 forwards/step.
TARGET_CUT = {50: 3.0, 10: 5.0}
MAX_FORWARDS = 3.0
EDIT_STEPS = 50
GRID_FRAMES = (0, 5, 11, 16)


# ---------------------------------------------------------------- clips


def write_frames_file(out: Path) -> None:
    """Every clip's engine input frames and all its frames at the proxy's size, with its VideoInfo."""
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for clip in CLIPS:
        tensors[f"{clip.name}.input"] = read_frames(clip.path, INPUT)[0].contiguous()
        tensors[f"{clip.name}.all"] = all_frames(clip).contiguous()
        meta[clip.name] = json.dumps(dataclasses.asdict(probe_video(clip.path)))
    save_file(tensors, str(out), metadata=meta)


def all_frames(clip) -> torch.Tensor:
    """Every frame of a clip at the proxy's size (its frame count is 4k+1, so none is dropped)."""
    return read_frames(clip.path, dataclasses.replace(INPUT, max_frames=clip.frames))[0]


@contextlib.contextmanager
def served_clips(frames_file: Path | None) -> Iterator[dict[str, torch.Tensor]]:
    """All frames of every clip by name; with `frames_file`, the engine reads the clips from it
    instead of decoding them (the GPU machine has no decord)."""
    if frames_file is None:
        yield {clip.name: all_frames(clip) for clip in CLIPS}
        return
    from safetensors import safe_open

    with safe_open(str(frames_file), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    infos = {name: VideoInfo(**json.loads(text)) for name, text in meta.items()}
    with serving({name: tensors[f"{name}.input"] for name in infos}, infos, INPUT):
        yield {clip.name: tensors[f"{clip.name}.all"] for clip in CLIPS}


@contextlib.contextmanager
def serving(frames: dict[str, torch.Tensor], infos: dict[str, VideoInfo], settings: FrameSettings) -> Iterator[None]:
    """The engine reads video `<dir>/<name>.<ext>` as `frames[name]` (uint8 [F, H, W, 3], already
    selected and at `settings`' size) with `infos[name]` as its facts: clips in memory, on a
    machine without decord or ffmpeg, keep their own cache ids."""

    def probe(video: str | Path) -> VideoInfo:
        return infos[Path(video).stem]

    def read(video: str | Path, asked: FrameSettings) -> tuple[torch.Tensor, VideoInfo]:
        if asked != settings:
            raise ValueError(f"the served frames are {settings}, not {asked}")
        return frames[Path(video).stem], probe(video)

    def check(video: str | Path) -> None:  # a served clip has no file; any other path is checked as usual
        if Path(video).stem not in infos:
            check_video_file(video)

    with (mock.patch("engine.workflow.probe_video", probe), mock.patch("engine.stages.encode.read_frames", read),
          mock.patch("engine.workflow.check_video_file", check)):
        yield


# ---------------------------------------------------------------- round trip


def round_trip(clip, steps: int, method: str, dtype: str | None, common: dict[str, Any]) -> dict[str, Any]:
    """One inversion and its verify pass: latent error, PSNR, forwards per inversion step."""
    forwards: list[int] = []

    def count(state: dict[str, Any]) -> None:
        if state["phase"] == "invert":
            forwards.append(state["forwards"])

    start = time.perf_counter()
    inv = engine.invert(
        clip.path, PROXY_DIR, steps=steps, source_prompt=clip.captions[0], guidance=1.0, verify=True,
        dtype=dtype, callback=count, **METHODS[method], **SIZE, **common,
    )
    return {
        "clip": clip.name, "held_out": clip.held_out, "steps": steps, "method": method, "dtype": str(inv.dtype),
        **inv.verify, "forwards_per_step": statistics.mean(forwards), "seconds": round(time.perf_counter() - start, 2),
    }


def round_trip_verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per clip, steps and dtype: each fixed-point variant's error cut against DDIM, and the targets."""
    ddim = {(r["clip"], r["steps"], r["dtype"]): r for r in rows if r["method"] == "ddim"}
    out = []
    for r in rows:
        base = ddim.get((r["clip"], r["steps"], r["dtype"]))
        if r["method"] == "ddim" or base is None:
            continue
        cut = base["latent_rel_error"] / r["latent_rel_error"]
        need = TARGET_CUT.get(r["steps"])
        out.append({
            "clip": r["clip"], "steps": r["steps"], "dtype": r["dtype"], "method": r["method"], "cut": cut,
            "diverged": not cut >= 1.0, "cut_target": need, "cut_met": None if need is None else cut >= need,
            "forwards_met": r["forwards_per_step"] <= MAX_FORWARDS,
        })
    return out


# ---------------------------------------------------------------- edits


def measure(frames: torch.Tensor, source: torch.Tensor, judge: ClipClassifier) -> dict[str, float]:
    """Structure kept from the source (PSNR, SSIM) and adherence to the target clip."""
    return {"psnr_db": psnr_db(frames, source), "ssim": ssim(frames, source), **judge.adherence(frames, TARGET.name)}


def run_edits(inv, source: torch.Tensor, judge: ClipClassifier, conditions: dict[str, dict[str, Any]], common: dict[str, Any], grid: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Edit the inversion towards the target caption under each condition; a failing condition
    (e.g. no compiler) is recorded and the rest still run."""
    rows = []
    for name, options in conditions.items():
        options = dict(options)
        prompt = options.pop("prompt", TARGET.captions[0])
        start = time.perf_counter()
        try:
            out = engine.edit(inv, [prompt], output="frames", **options, **common)
        except Exception as exc:  # noqa: BLE001 - reported in the table, the benchmark goes on
            rows.append({"condition": name, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            print(f"edit {name}: {rows[-1]['error']}", flush=True)
            continue
        frames = torch.as_tensor(np.asarray(out.frames[0]))
        grid[name] = frames
        rows.append({"condition": name, "prompt": prompt, **measure(frames, source, judge), "seconds": round(time.perf_counter() - start, 2)})
        print(f"edit {name}: {rows[-1]}", flush=True)
    return rows


def batch_check(inv, common: dict[str, Any]) -> dict[str, Any]:
    """Four prompts in one pass against one by one: the same latents up to rounding."""
    prompts = [TARGET.captions[0], *(c.captions[0] for c in TRAINING if c is not TARGET), TARGET.captions[1]]
    together = engine.edit(inv, prompts, output="latents", batch=4, **common).latents.float()
    alone = engine.edit(inv, prompts, output="latents", batch=1, **common).latents.float()
    return {
        "prompts": prompts,
        "max_abs_diff": (together - alone).abs().max().item(),
        "rel_diff": ((together - alone).norm() / alone.norm()).item(),
        "latent_abs_max": alone.abs().max().item(),
    }


# ---------------------------------------------------------------- report


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def grid_png(path: Path, rows: dict[str, torch.Tensor]) -> None:
    """One row per video (label, then GRID_FRAMES), for looking at what the numbers say."""
    from PIL import Image, ImageDraw

    label_w, (h, w) = 230, next(iter(rows.values())).shape[1:3]
    image = Image.new("RGB", (label_w + w * len(GRID_FRAMES), h * len(rows)), "white")
    draw = ImageDraw.Draw(image)
    for r, (name, frames) in enumerate(rows.items()):
        draw.text((4, r * h + h // 2 - 6), name, fill="black")
        for c, f in enumerate(GRID_FRAMES):
            image.paste(Image.fromarray(frames[f].numpy()), (label_w + c * w, r * h))
    image.save(path)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table; columns are (header, key, format)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        cells = [("-" if r.get(k) is None else format(r[k], f)) for _, k, f in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """QUALITY.md's tables from quality.json's content."""
    training = json.loads((PROXY_DIR / "TRAINING.json").read_text())["heldout_v_loss"]
    parts = [
        "# Quality on the trained proxy (issue 11, item 4)",
        f"{result['device']}, torch {result['torch']}, {result['date']}. Command: `{result['command']}`. "
        "Numbers are the proxy's (engine/assets/proxy, 7M parameters), not CogVideoX-5B's. The proxy's held-out "
        f"v-loss is {training['proxy']:.3f} against {training['random_tiny']:.3f} for the random tiny model "
        f"(ratio {training['ratio']:.2f}); samples from noise: [proxy_samples.png](proxy_samples.png).",
        "## Round trip",
        "`engine.invert(..., verify=True)`, source prompt = the clip's caption, guidance 1.0 (no CFG); latent "
        "error = ||x0' - x0|| / ||x0||; forwards = transformer calls per inversion step (callback).",
        table(result.get("round_trip", []), [("clip", "clip", ""), ("steps", "steps", "d"), ("dtype", "dtype", ""), ("method", "method", ""),
              ("latent error", "latent_rel_error", ".4f"), ("PSNR dB", "psnr_db", ".2f"), ("forwards/step", "forwards_per_step", ".2f"),
              ("s", "seconds", ".1f")]),
        "Against DDIM (cut = DDIM's latent error / this one's; targets: >= 5x at 10 steps, >= 3x at 50, "
        "never worse, <= 3 forwards/step):",
        table(result.get("round_trip_verdicts", []), [("clip", "clip", ""), ("steps", "steps", "d"), ("dtype", "dtype", ""), ("method", "method", ""),
              ("cut", "cut", ".2f"), ("target", "cut_target", ".0f"), ("met", "cut_met", ""), ("worse than DDIM", "diverged", ""),
              ("<= 3 fwd", "forwards_met", "")]),
        "## Edits",
        f"{result.get('edit_setup', '')}",
        table(result.get("edits", []), [("condition", "condition", ""), ("PSNR dB vs source", "psnr_db", ".2f"), ("SSIM vs source", "ssim", ".3f"),
              ("P(target clip)", "p_target", ".3f"), ("frames as target", "frac_target", ".2f"), ("s", "seconds", ".1f"), ("error", "error", "")]),
        "Frames 0, 5, 11, 16 of each: [quality_grid.png](quality_grid.png).",
    ]
    if "batch" in result:
        b = result["batch"]
        parts.append(f"Batching: 4 prompts in one pass vs one by one: max |difference| of the edited latents {b['max_abs_diff']:.3g} "
                     f"(relative {b['rel_diff']:.3g}; latents reach {b['latent_abs_max']:.2f}).")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- main


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(device=args.device, cache_dir=tempfile.mkdtemp(prefix="cogedit-quality-"))
    result: dict[str, Any] = {
        "device": device_name(args.device or ("cuda" if torch.cuda.is_available() else "cpu")), "torch": torch.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": " ".join(["benchmarks/quality.py", *sys.argv[1:]]),
    }
    edit_steps = 10 if args.quick else EDIT_STEPS
    with served_clips(args.frames_file) as clips:
        judge = fit_classifier({c.name: clips[c.name] for c in TRAINING})
        inv = engine.invert(HELD_OUT.path, PROXY_DIR, steps=edit_steps, source_prompt=HELD_OUT.captions[0], **SIZE, **common)
        source = inv.frames()
        result["classifier"] = classifier_checks(judge, clips, source)
        result["edit_setup"] = edit_setup(edit_steps, result["classifier"])
        grid = {f"source ({HELD_OUT.name})": source, f"target clip ({TARGET.name})": clips[TARGET.name][:PROXY_FRAMES]}
        conditions = edit_conditions(engine.inspect_model(PROXY_DIR).transformer_config["num_layers"])
        if args.runtimes_only:  # the eager default beside the --fp8/--compile rows, nothing else
            conditions = {"full window 0:1, eager": dict(compile=False)}
        result["edits"] = run_edits(inv, source, judge, conditions, common, grid)
        save(out, result, grid)
        if not args.runtimes_only:
            result["batch"] = batch_check(inv, common)
            save(out, result, grid)
            run_round_trips(args, common, result, lambda: save(out, result, grid))
        # Last: a compile can take minutes, and what came before should not wait on it.
        runtimes = {"fp8, full window, eager": dict(fp8=True, compile=False)} if args.fp8 else {}
        runtimes.update({"compile, full window": dict(compile=True)} if args.compile else {})
        result["edits"] += run_edits(inv, source, judge, runtimes, common, grid)
        save(out, result, grid)


def edit_conditions(num_layers: int) -> dict[str, dict[str, Any]]:
    """Each edit condition's `engine.edit` options (and prompt, where not the target's): the
    upstream default is the full window; a reconstruction and a sample from noise bracket them."""
    half = num_layers // 2
    return {
        "no injection": dict(inject_strength=0.0),
        "full window 0:1 (default)": {},
        **{f"window 0:{w}": dict(inject_steps=f"0:{w}") for w in (0.8, 0.6, 0.4, 0.2)},
        f"layers 0-{half - 1} (first half)": dict(inject_layers=f"0-{half - 1}"),
        f"layers {half}-{num_layers - 1} (second half)": dict(inject_layers=f"{half}-{num_layers - 1}"),
        "reference per-half": dict(reference="per-half"),
        "reconstruction (source caption, full window)": dict(prompt=HELD_OUT.captions[0]),
        "noise sample (init random, no injection)": dict(init="random", inject_strength=0.0),
    }


def edit_setup(steps: int, checks: dict[str, Any]) -> str:
    return (
        f"Source: {HELD_OUT.name} (held out), inverted once with the engine's defaults (DDIM, {steps} steps, CFG 6, "
        f"source prompt {HELD_OUT.captions[0]!r}); edits towards {TARGET.name}'s caption {TARGET.captions[0]!r}, edit CFG 6, "
        f"{steps} steps. PSNR/SSIM against the source frames; P(target clip) = mean probability of that clip under a softmax "
        "regression on the three training clips' frames and their mirror images (benchmarks/frame_measures.py; it names "
        f"each training clip's own frames correctly: {checks['training_clips_own_accuracy']}). For scale: the unedited source "
        f"scores P {checks['source_p_target']:.3f} (it reads as {checks['source_class_probabilities']}), the target clip's own "
        f"frames P {checks['target_p_target']:.3f}."
    )


def run_round_trips(args: argparse.Namespace, common: dict[str, Any], result: dict[str, Any], save_now) -> None:
    """Every clip x steps x method, per dtype; saved after each clip."""
    steps_list = (10,) if args.quick else (10, 25, 50)
    methods = ("ddim", "fixed-point x1") if args.quick else tuple(METHODS)
    result["round_trip"] = []
    for dtype in args.dtypes.split(",") if args.dtypes else [None]:
        for clip in (TRAINED, HELD_OUT):
            for steps in steps_list:
                for method in methods:
                    result["round_trip"].append(round_trip(clip, steps, method, dtype, common))
                    print("round trip", result["round_trip"][-1], flush=True)
            result["round_trip_verdicts"] = round_trip_verdicts(result["round_trip"])
            save_now()


def save(out: Path, result: dict[str, Any], grid: dict[str, torch.Tensor]) -> None:
    """quality.json, QUALITY.md and the grid as they stand, so a run cut short keeps its results."""
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    (out / "QUALITY.md").write_text(markdown(result))
    grid_png(out / "quality_grid.png", grid)


def classifier_checks(judge: ClipClassifier, clips: dict[str, torch.Tensor], source: torch.Tensor) -> dict[str, Any]:
    """What makes the adherence measure meaningful: it knows the training clips, and the
    unedited source does not already look like the target."""
    own = {c.name: judge.adherence(clips[c.name], c.name)["frac_target"] for c in TRAINING}
    p = judge.probabilities(source).mean(0)
    return {
        "training_clips_own_accuracy": own,
        "source_class_probabilities": dict(zip(judge.names, p.tolist(), strict=True)),
        "source_p_target": judge.adherence(source, TARGET.name)["p_target"],
        "target_p_target": judge.adherence(clips[TARGET.name], TARGET.name)["p_target"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    frames = sub.add_parser("frames", help="decode the clips into a frames file (needs decord)")
    frames.add_argument("--out", required=True, type=Path)
    go = sub.add_parser("run", help="run the benchmark")
    go.add_argument("--out", required=True, type=Path)
    go.add_argument("--device", default=None)
    go.add_argument("--frames-file", type=Path, default=None, help="clips from `frames`, for a machine without decord")
    go.add_argument("--dtypes", default=None, help="round-trip dtypes, e.g. bf16,fp32 (default: the engine's)")
    go.add_argument("--fp8", action="store_true", help="add an fp8 edit (torchao, a GPU with FP8)")
    go.add_argument("--compile", action="store_true", help="add a torch.compile edit")
    go.add_argument("--runtimes-only", action="store_true", help="only the default edit and the --fp8/--compile ones")
    go.add_argument("--quick", action="store_true", help="10 steps, two methods: a tiny grid to try it out")
    args = parser.parse_args()
    if args.command == "frames":
        write_frames_file(args.out)
    else:
        run(args)


if __name__ == "__main__":
    main()
