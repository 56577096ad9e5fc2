"""GPU benchmark: the upstream method side by side with cogedit's memory plans.

    python benchmarks/bench.py --out results.json                 # full-size 5B, random weights
    python benchmarks/bench.py --out results.json --variants int8,nf4,staged
    python benchmarks/bench.py --tiny --out /tmp/tiny.json         # the harness itself, on a CPU

Builds a CogVideoX-5B-shaped checkpoint with random weights once (memory and time are the real
model's; pixels are noise), then runs every variant on the same 49x480x720 clip with a few
steps each: per phase, the time per step (median), the peak allocated and reserved memory, and
for cogedit's plans the prediction of engine.models.plans. Each cogedit plan runs under the memory cap
of the card it is meant for (torch.cuda.set_per_process_memory_fraction), so passing means it
fits that card. Whole-workflow times at 50 steps are derived: fixed costs + 50 x step time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from engine.models.components import Runtime  # noqa: E402
from engine.models.model_info import inspect_model  # noqa: E402
from engine.models.plans import PLANS, Workload, predict_peaks  # noqa: E402
from engine.stages.settings import InjectSettings, parse_window  # noqa: E402
from engine.video.clips import DEMO_VIDEO  # noqa: E402
from engine.video.reader import FrameSettings, read_frames, to_model_input  # noqa: E402

CLIP = Path(__file__).with_name("clip49.mp4")
GiB = 1 << 30
# Which card each plan is meant for (cards are sold in GiB: a "12 GB" card has 12 GiB),
# emulated with an allocator cap 0.5 GiB below it, the room a CUDA context takes.
CAPS = {
    "staged": 16, "staged-compiled": 16, "staged-fp8-compiled": 16,
    "staged-4prompts": 24, "staged-4prompts-compiled": 24, "staged-4prompts-fp8-compiled": 24,
    "lean": 12, "int8": 12, "nf4": 8, "offload": 8, "disk": 24,
}
CONTEXT_GIB = 0.5


def matmul_peak_tflops() -> float:
    """Measured bf16 matmul rate (8192^3), the denominator of 'fraction of peak'."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def row_flops(tokens: int, params_linear: float, layers: int, width: int, key_factor: int = 1) -> float:
    """FLOPs of one row through the transformer: linear layers + attention (QK^T and PV)."""
    return 2 * params_linear * tokens + layers * 4 * tokens * tokens * key_factor * width


def cap(gb: float | None) -> None:
    """Limit the allocator to a card of `gb` GiB (None: no limit)."""
    if not torch.cuda.is_available():
        return
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if gb is None else min(1.0, (gb - CONTEXT_GIB) * GiB / total))


def _marks(sync: bool):
    """A step callback and what it records: (step index, time at its end), one list per engine call."""
    marks: list[tuple[int, float]] = []

    def callback(state) -> None:
        if sync:
            torch.cuda.synchronize()
        marks.append((state["i"], time.perf_counter()))

    return marks, callback


def evict(files: list[Path]) -> None:
    """Drop files from the page cache, so the next read comes from the disk (clean pages only: fsync first)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read_rate(files: list[Path]) -> float:
    """Bytes per second of a plain sequential read of `files` from the disk (evicted before and after)."""
    evict(files)
    start, total = time.perf_counter(), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(16 << 20):
                total += len(chunk)
    rate = total / (time.perf_counter() - start)
    evict(files)
    return rate


def live_cuda_tensors(limit: int = 8) -> dict:
    """What GPU memory is still allocated after a variant, and the largest tensors Python can see."""
    import gc

    gc.collect()
    found = {}
    for obj in gc.get_objects():
        with contextlib.suppress(Exception):
            if torch.is_tensor(obj) and obj.is_cuda:
                found[obj.untyped_storage().data_ptr()] = (obj.untyped_storage().nbytes(), f"{tuple(obj.shape)} {obj.dtype}")
    largest = sorted(found.values(), reverse=True)[:limit]
    return {"allocated": torch.cuda.memory_allocated(), "seen_bytes": sum(b for b, _ in found.values()), "largest": [f"{b / GiB:.2f} GiB {d}" for b, d in largest]}


def run_plan(name: str, model: Path, clip: Path, args, cache_dir: Path) -> dict:
    """One cogedit plan, whole workflow (invert, edit, the edit again from the cache) under its cap."""
    cuda = torch.cuda.is_available()
    plan = "staged" if name.startswith("staged") or name == "disk" else name
    compiled = name.endswith("-compiled")
    fp8 = "-fp8" in name
    reporter = engine.Reporter(device="cuda" if cuda else "cpu")
    inv_kw = dict(steps=args.steps, frames=args.frames, height=args.height, width=args.width)
    edit_kw: dict = dict(inject_steps="0:1")
    if name == "disk":
        # Store every block of the middle steps (all but the first and last) and replay them: two
        # replayed steps in a row show whether reading keeps up; the last step has no injection.
        window = f"{1 / args.steps:.4f}:{(args.steps - 1) / args.steps:.4f}"
        inv_kw.update(attention_store="disk", attention_steps=window, attention_dtype="fp8")
        edit_kw.update(reference="stored", inject_steps=window)
    prompts = ["a watercolor painting"] * (4 if "4prompts" in name else 1)
    calls = []
    start = time.perf_counter()
    marks, cb = _marks(cuda)
    inv = engine.invert(clip, model, plan=plan, compile=compiled, fp8=fp8, reporter=reporter, callback=cb, cache_dir=cache_dir, **inv_kw)
    calls.append(("invert", marks))
    extra: dict = {}
    if name == "disk" and cuda:
        shards = [f for key in inv.stores() for f in inv.store_files(key)]
        extra["store_bytes"] = sum(f.stat().st_size for f in shards)
        extra["disk_read_bytes_per_s"] = disk_read_rate(shards)  # leaves them evicted: the edit reads from the disk
    for label, output in (("edit", "frames"), ("edit-again", "latents")):
        marks, cb = _marks(cuda)
        result = engine.edit(inv, prompts, plan=plan, compile=compiled, fp8=fp8, reporter=reporter, callback=cb, cache_dir=cache_dir, batch=args.batch, output=output, **edit_kw)
        calls.append((label, marks))
    LATENTS[name] = {"noise": inv.noise().float()}
    if edit_kw["inject_steps"] == "0:1":  # edits comparable with the staged plan's
        LATENTS[name]["edit"] = result.latents.float()
    total = time.perf_counter() - start
    phases = {}
    for r in reporter.records:
        key = r.name
        while key in phases:
            key += "+"
        phases[key] = {"seconds": r.seconds, "peak_alloc": r.peak_bytes, "peak_reserved": r.peak_reserved, "cache_hit": r.cache_hit}
    window = edit_kw["inject_steps"]
    injected = InjectSettings(window=parse_window(window)).active_steps(args.steps)
    for label, ts in calls:
        phase = "invert" if label == "invert" else ("edit" if label == "edit" else "edit+")
        if phase in phases:
            # The time of step i runs from the end of step i-1 to the end of step i.
            phases[phase]["step_times"] = [b - a for (_, a), (_, b) in zip(ts, ts[1:])]
            if phase != "invert":
                phases[phase]["step_injected"] = [i in injected for i, _ in ts[1:]]
    info = inspect_model(model)
    workload = Workload(args.frames, args.height, args.width, min(len(prompts), args.batch), True, reference="stored" if name == "disk" else "shared")
    return {"seconds": total, "phases": phases, "predicted": predict_peaks(PLANS[plan], info, workload), "prompts": len(prompts), "batch": args.batch, "compiled": compiled, "fp8": fp8, **extra}


# Final inverted noise and edited latents of each variant, to compare numerics with the staged plan.
LATENTS: dict[str, dict[str, torch.Tensor]] = {}


def latent_differences(baseline: str = "staged") -> dict:
    """Relative L2 and max abs difference of each variant's latents from the baseline's (same inputs)."""
    out = {}
    for name, lat in LATENTS.items():
        if name == baseline or baseline not in LATENTS:
            continue
        out[name] = {}
        for key, x in lat.items():
            ref = LATENTS[baseline][key]
            if x.shape == ref.shape:
                out[name][key] = {"rel_l2": ((x - ref).norm() / ref.norm()).item(), "max_abs": (x - ref).abs().max().item()}
    return out


def model_path(workdir: Path, tiny: bool) -> Path:
    """The random-weight checkpoint under `workdir` (the tiny model, or the full-size 5B), written by
    the first process that needs it and reused after (a file lock: commands on two GPUs share it)."""
    from filelock import FileLock

    path = workdir / ("tiny" if tiny else "cogvideox-5b-random")
    workdir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / "model_index.json").exists():
            if tiny:
                engine.build_tiny_model(path)
            else:
                from engine.models.tiny import write_random_5b

                write_random_5b(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", default="upstream,model_offload,staged,staged-4prompts,lean,offload,sequential,disk")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4, help="prompts per transformer pass in staged-4prompts")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the harness only")
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    args = ap.parse_args()
    if args.tiny:
        args.frames, args.height, args.width = 9, 96, 160
    else:
        args.frames, args.height, args.width = 49, 480, 720
    cuda = torch.cuda.is_available()
    results: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "steps_timed": args.steps,
        "workload": {"frames": args.frames, "height": args.height, "width": args.width},
        "variants": {},
    }
    t0 = time.perf_counter()
    model = model_path(Path(args.workdir), args.tiny)
    results["build_seconds"] = time.perf_counter() - t0
    info = inspect_model(model)
    cfg = info.transformer_config
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    from engine.models.plans import param_counts, sequence_tokens

    tokens = sequence_tokens(info, args.frames, args.height, args.width)

    results["flops"] = {
        "tokens": tokens,
        "row": row_flops(tokens, param_counts(info)["transformer"], cfg["num_layers"], width),
        "edit_row_doubled_keys": row_flops(tokens, param_counts(info)["transformer"], cfg["num_layers"], width, 2),
    }
    if cuda:
        results["peak_tflops_bf16"] = matmul_peak_tflops()
    frames, _ = read_frames(CLIP if not args.tiny else DEMO_VIDEO, FrameSettings(args.frames, height=args.height, width=args.width))
    frames = to_model_input(frames)
    runtime = Runtime.default()
    for name in [v for v in args.variants.split(",") if v]:
        print(f"== {name}", flush=True)
        cache_dir = Path(args.workdir) / f"cache-{name}"
        try:
            if name in ("upstream", "model_offload", "sequential"):
                cap(None)
                from benchmarks.upstream import run_upstream

                mode = {"upstream": "resident"}.get(name, name)
                row = {"phases": run_upstream(info, runtime, frames, args.steps, mode)}
            else:
                cap(None if args.tiny else CAPS.get(name))
                row = run_plan(name, model, CLIP if not args.tiny else DEMO_VIDEO, args, cache_dir)
                row["cap_gb"] = CAPS.get(name)
            row["ok"] = True
        except Exception as exc:  # a variant that fails (OOM under its cap) is a result too
            row = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}", "trace": traceback.format_exc()[-2000:]}
        finally:
            cap(None)
            shutil.rmtree(cache_dir, ignore_errors=True)
            engine.models.components.free_memory()
        if not row["ok"] and cuda and "out of memory" in row["error"] and name in CAPS:
            # Measure what it does need, with no cap (after the failed run's frames are gone).
            engine.models.components.free_memory()
            try:
                row["uncapped"] = run_plan(name, model, CLIP, args, cache_dir)
            except Exception as exc:
                row["uncapped"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            shutil.rmtree(cache_dir, ignore_errors=True)
            engine.models.components.free_memory()
        for ph in row.get("phases", {}).values():
            if ph.get("step_times"):
                ph["median_step"] = statistics.median(ph["step_times"])
        if cuda:
            row["left_allocated"] = live_cuda_tensors()
        results["variants"][name] = row
        results["latent_differences"] = latent_differences()
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}, default=str)[:1500], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
