"""CogVideoX1.5-5B on a GPU: the full-size architecture with random weights, 81x768x1360.

    # on an H100/H200, in calls of at most 10 minutes (the checkpoint and cache stay in --workdir)
    python benchmarks/cogvideox15.py --out $OUT/v15-a.json --variants plans,upstream,staged,lean,offload --steps 3
    python benchmarks/cogvideox15.py --out $OUT/v15-b.json --variants invert50 --edit-steps 50
    python benchmarks/cogvideox15.py --out $OUT/v15-c.json --variants edit50 --edit-steps 50
    python benchmarks/cogvideox15.py --out $OUT/v15-d.json --variants further50,lean161 --edit-steps 50
    # here, on the CPU: the harness end to end on the tiny 1.5 model (9x96x160)
    python benchmarks/cogvideox15.py --tiny --out /tmp/v15.json

Writes the CogVideoX1.5-5B-shaped checkpoint once (engine.models.tiny.write_random_5b, arch
1.5) and a synthetic clip of the model's size; memory and time are the real model's, pixels are
noise. Variants (`--variants`, run in the order given, each result written as it lands):
- plans: engine.models.plans' predicted peak per phase of every plan at 81 and 161 frames, and
  the plan `--vram 24GB` and `--vram 12GB` pick (no GPU work)
- upstream: what THUDM/CogVideo's inference/ddim_inversion.py does with this model and clip:
  encode, embed, then the transformer on the 21 unpadded latent frames with the pipeline's own
  1.5 rotary tables; it fails at the patch embedding (CogVideo #728), and the error is the result
- staged, lean, offload: cogedit's plans through benchmarks/bench.py's run_plan (invert, edit,
  edit again from the cache, `--steps` steps each) under the allocator cap of the card each is
  meant for here (staged and lean 24 GB, offload 12 GB; over its cap, a plan is measured again
  without one and marked over_cap): peaks and step times per phase;
  staged-fp8-compiled (and bench.py's other names) the same with FP8 matmuls, compiled
- invert50, edit50, further50: the first edit (invert then edit, defaults, `--edit-steps`
  steps, empty caches) and a further edit from the cache, wall clock of the real engine calls
  (benchmarks/e2e.py's _timed_call); split in three so each fits a 10-minute call
- lean161: the lean plan at 161 frames (10 s) for `--steps` steps, against its prediction
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from benchmarks.bench import cap, run_plan  # noqa: E402
from benchmarks.e2e import _timed_call  # noqa: E402
from engine.errors import GPUOutOfMemoryError  # noqa: E402
from engine.models.model_info import ModelInfo, builtin_15, inspect_model  # noqa: E402
from engine.models.plans import PLANS, GiB, Workload, choose_plan, predict_peaks, sequence_tokens  # noqa: E402

FULL = dict(frames=81, height=768, width=1360)
TINY = dict(frames=9, height=96, width=160)
# The card each plan is meant for at 81x768x1360 (GiB, as cards are sold): staged is what
# `--vram 24GB` picks there, so running it under that cap checks the pick.
CAPS = {"staged": 24, "lean": 24, "offload": 12}
PROMPTS = ("a watercolor painting", "a charcoal sketch at night")


def model_path(workdir: Path, tiny: bool) -> Path:
    """The random-weight 1.5 checkpoint, written once per --workdir (the tiny one through the CLI's builder)."""
    path = workdir / ("tiny-1.5" if tiny else "cogvideox1.5-5b-random")
    if not (path / "model_index.json").exists():
        if tiny:
            engine.build_tiny_model(path, arch="1.5")
        else:
            from engine.models.tiny import write_random_5b

            write_random_5b(path, arch="1.5")
    return path


def clip_path(workdir: Path, frames: int, height: int, width: int) -> Path:
    """A synthetic clip of exactly `frames` frames at height x width, 16 fps: a moving gradient."""
    import numpy as np

    from engine.stages.decode import write_video

    path = workdir / f"clip{frames}x{height}x{width}.mp4"
    if not path.exists():
        y, x = np.mgrid[0:height, 0:width]
        video = np.stack([np.stack([(x + 8 * f) % 256, (y + 4 * f) % 256, (x + y) // 4 % 256], -1) for f in range(frames)]).astype(np.uint8)
        write_video(video, path, fps=16.0)
    return path


def plans(info: ModelInfo) -> dict:
    """Predicted peaks of every plan at 81 and 161 frames, and the plan each card size gets."""
    out = {}
    for frames in (81, 161):
        w = Workload(frames, 768, 1360)
        peaks = {name: {k: v / GiB for k, v in predict_peaks(p, info, w).items()} for name, p in PLANS.items()}
        chosen = {}
        for gb in (80, 24, 16, 12):
            try:
                chosen[f"{gb}GB"] = choose_plan(gb * GiB, info, w).name
            except engine.SettingsError as exc:
                chosen[f"{gb}GB"] = str(exc)
        out[str(frames)] = {"tokens": sequence_tokens(info, frames, 768, 1360), "peaks_gib": peaks, "vram_picks": chosen}
    return out


def upstream_rotary(transformer: torch.nn.Module, height: int, width: int, latent_frames: int, device: str) -> tuple:
    """The rotary tables upstream's script asks the diffusers pipeline for (for the latents it has)."""
    from diffusers import CogVideoXPipeline

    pipe = SimpleNamespace(transformer=transformer, vae_scale_factor_spatial=8)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, height, width, latent_frames, device)


def upstream(info: ModelInfo, clip: Path, size: dict, device: str) -> dict:
    """Upstream's inversion on 1.5 up to its first transformer call, which fails on the odd latent count."""
    from engine.models.components import Runtime, free_memory, load_component, load_tokenizer
    from engine.stages.embed import tokenize
    from engine.stages.encode import encode_frames
    from engine.video.reader import FrameSettings, read_frames, to_model_input

    runtime = Runtime.default(device, compile=False)
    frames, _ = read_frames(clip, FrameSettings(size["frames"], height=size["height"], width=size["width"]))
    vae = load_component("vae", info, runtime)
    latents = encode_frames(vae, to_model_input(frames))
    del vae
    t5 = load_component("text_encoder", info, runtime)
    with torch.no_grad():
        empty = t5(tokenize(load_tokenizer(info), "", info.text_length).to(device))[0].to(runtime.dtype)
    del t5
    free_memory()
    transformer = load_component("transformer", info, runtime)
    x = latents.to(device, runtime.dtype).repeat(2, 1, 1, 1, 1)  # CFG: two rows, as upstream inverts
    out = {"latent_frames": latents.shape[1], "frames": frames.shape[0]}
    try:
        with torch.no_grad():
            transformer(hidden_states=x, encoder_hidden_states=empty.expand(2, -1, -1), timestep=torch.tensor([999, 999], device=device),
                        image_rotary_emb=upstream_rotary(transformer, size["height"], size["width"], x.shape[1], device), return_dict=False)
        out.update(failed=False)
    except Exception as exc:  # the failure is the result
        out.update(failed=True, error=f"{type(exc).__name__}: {str(exc)[:400]}", where=traceback.extract_tb(exc.__traceback__)[-1].name)
    del transformer
    free_memory()
    return out


def plan_row(name: str, model: Path, clip: Path, size: dict, steps: int, workdir: Path, tiny: bool) -> dict:
    """One cogedit plan (bench.run_plan's names: staged, lean, offload, staged-fp8-compiled, ...)
    under its card's cap."""
    plan = name.removesuffix("161")
    limit = None if tiny else CAPS[plan.split("-")[0]]
    args = SimpleNamespace(steps=steps, batch=4, **size)
    cache_dir = workdir / f"cache-{name}"
    try:
        cap(limit)
        row = run_plan(plan, model, clip, args, cache_dir)
    except (torch.OutOfMemoryError, GPUOutOfMemoryError) as exc:  # over its card: what it needs, measured with no cap
        shutil.rmtree(cache_dir, ignore_errors=True)
        engine.models.components.free_memory()
        cap(None)
        row = {**run_plan(plan, model, clip, args, cache_dir), "over_cap": str(exc)[:300]}
    finally:
        cap(None)
        shutil.rmtree(cache_dir, ignore_errors=True)
    row["cap_gb"] = limit
    row["measured_peak_gib"] = max(p["peak_alloc"] or 0 for p in row["phases"].values()) / GiB
    row["predicted_peak_gib"] = max(row["predicted"].values()) / GiB
    return row


def timed(call: str, model: Path, clip: Path, size: dict, steps: int, workdir: Path) -> dict:
    """The first edit's two calls (invert50, edit50: empty caches, defaults) or a further edit, timed."""
    cuda = torch.cuda.is_available()
    cache_dir = workdir / "cache-first-edit"
    if call == "invert50":
        shutil.rmtree(cache_dir, ignore_errors=True)
    reporter = engine.Reporter(device="cuda" if cuda else "cpu")
    common = dict(cache_dir=cache_dir, reporter=reporter)
    inverted: list = []
    inv = lambda cb=None: inverted.append(engine.invert(clip, model, steps=steps, callback=cb, **size, **common))  # noqa: E731
    if call == "invert50":
        return _timed_call(inv, reporter, cuda)
    inv()  # a cache hit: the inversion invert50 made
    prompt = [PROMPTS[0] if call == "edit50" else PROMPTS[1]]
    return _timed_call(lambda cb: engine.edit(inverted[0], prompt, output="frames", callback=cb, **common), reporter, cuda)


def run_variant(name: str, args: argparse.Namespace, model: Path, workdir: Path) -> dict:
    size = TINY if args.tiny else FULL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "plans":
        return plans(builtin_15() if not args.tiny else inspect_model(model))
    if name == "lean161":
        size = dict(size, frames=2 * size["frames"] - 1)  # 161 frames (17 on the tiny model)
    clip = clip_path(workdir, **size)
    if name == "upstream":
        return upstream(inspect_model(model), clip, size, device)
    if name.split("-")[0] in ("staged", "lean", "offload", "lean161"):
        if (name == "offload" or "fp8" in name) and device == "cpu":
            return {"skipped": f"{name} needs a CUDA GPU"}
        return plan_row(name, model, clip, size, args.steps, workdir, args.tiny)
    if name in ("invert50", "edit50", "further50"):
        return timed(name, model, clip, size, args.edit_steps, workdir)
    raise SystemExit(f"unknown variant {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default="plans,upstream,staged,lean,offload")
    ap.add_argument("--steps", type=int, default=3, help="steps of each plan's invert and edits (peaks, step times)")
    ap.add_argument("--edit-steps", type=int, default=50, help="steps of invert50/edit50/further50")
    ap.add_argument("--tiny", action="store_true", help="the tiny 1.5 model on the CPU: checks the harness only")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "cogedit-v15"))
    args = ap.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(workdir / "inductor"))
    cuda = torch.cuda.is_available()
    results = {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
        "workload": TINY if args.tiny else FULL, "variants": {},
    }
    start = time.perf_counter()
    model = model_path(workdir, args.tiny)
    results["model_seconds"] = time.perf_counter() - start
    for name in [v for v in args.variants.split(",") if v]:
        print(f"== {name}", flush=True)
        began = time.perf_counter()
        try:
            row = {"ok": True, **run_variant(name, args, model, workdir)}
        except Exception as exc:  # a variant that fails (OOM under its cap) is a result too
            row = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}", "trace": traceback.format_exc()[-2000:]}
        finally:
            engine.models.components.free_memory()
        row["variant_seconds"] = time.perf_counter() - began
        results["variants"][name] = row
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}, default=str)[:1500], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
