"""Cost of one DDIM inversion step, plain and with fixed-point refinement (engine.stages.fixed_point).

    python benchmarks/inversion_cost.py --out benchmarks/results   # full-size 5B, random weights, GPU
    python benchmarks/inversion_cost.py --out /tmp/ic --tiny        # the tests' tiny model on the CPU

Builds the CogVideoX-5B transformer with random weights on the GPU in bf16 (no disk), and times
inversion steps of a 49-frame 480x720 latent along a 50-step inversion from a random clean
latent (one row, no CFG; CFG doubles every forward): per variant a warm-up step, then timed steps,
median. The refinement runs with tol 0, so it stops only when its budget is spent or the residual
grows; forwards per step are as counted by `refine`, plus the plain step's one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.models.configs import SCHEDULER_5B
from engine.models.denoiser import predict, rotary_embeddings
from engine.models.tiny import random_transformer
from engine.stages.fixed_point import refine, step_coefficients


def build(tiny: bool) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The transformer, a clean latent and a text embedding, at full or tiny size."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    if tiny:
        from engine.models.tiny import build_tiny_model

        path = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
        model = CogVideoXTransformer3DModel.from_pretrained(path, subfolder="transformer")
        return model.eval(), torch.randn(1, 3, 16, 12, 20), torch.randn(1, 226, 32)
    model = random_transformer("cuda")
    latent = torch.randn(1, 13, 16, 60, 90, device="cuda", dtype=torch.bfloat16)
    return model, latent, torch.randn(1, 226, 4096, device="cuda", dtype=torch.bfloat16)


def clock(cuda: bool):
    """Start a timer; the returned function gives the milliseconds since (CUDA events on the GPU)."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()

        def stop() -> float:
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return stop
    began = time.perf_counter()
    return lambda: (time.perf_counter() - began) * 1e3


@torch.no_grad()
def run_variant(model, latent, embeds, steps: int, iters: int, timed: int) -> dict:
    """One warm-up and `timed` inversion steps, plain (iters 0) or refined with `iters` updates."""
    from diffusers import CogVideoXDDIMScheduler, DDIMInverseScheduler

    inverse, edit = DDIMInverseScheduler.from_config(SCHEDULER_5B), CogVideoXDDIMScheduler.from_config(SCHEDULER_5B)
    inverse.set_timesteps(steps)
    edit.set_timesteps(steps)
    rotary = rotary_embeddings(model, latent.shape, 8, latent.device)
    cuda = latent.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    x, rows = latent, []
    for t in inverse.timesteps[: 1 + timed]:
        stop = clock(cuda)
        v = predict(model, x, embeds, t, rotary)
        x_t = inverse.step(v, t, x, return_dict=False)[0]
        forwards, residuals = 0, []
        if iters:
            a, b = step_coefficients(edit, t)
            x_t, forwards, residuals = refine(
                lambda y, t=t: predict(model, y.to(latent.dtype), embeds, t, rotary), x, x_t, a, b, iters, tol=0.0
            )
        x = x_t.to(latent.dtype)
        rows.append({"t": int(t), "ms": stop(), "forwards": 1 + forwards, "residuals": residuals})
    measured = rows[1:]
    ms = statistics.median(r["ms"] for r in measured)
    forwards = statistics.mean(r["forwards"] for r in measured)
    return {
        "iters": iters,
        "ms_per_step": ms,
        "forwards_per_step": forwards,
        "ms_per_forward": ms / forwards,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "steps": rows,
    }


def table(results: dict) -> str:
    title = (
        f"Inversion step cost, {results['device']}, torch {results['torch']}, {results['date']}; latent {results['latent']}, "
        f"{results['schedule_steps']}-step schedule, one row (no CFG), median of {results['timed']} steps after a warm-up."
    )
    lines = [
        title,
        "Made by `python benchmarks/inversion_cost.py --out DIR` on the GPU ([inversion_cost.png](inversion_cost.png)).",
        "",
        "| variant | forwards / step | ms / step | ms / forward | x plain | peak GiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    plain = results["variants"][0]["ms_per_step"]
    for row in results["variants"]:
        name = "plain DDIM" if row["iters"] == 0 else f"fixed point, {row['iters']} iter"
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.1f}"
        lines.append(
            f"| {name} | {row['forwards_per_step']:.2f} | {row['ms_per_step']:.1f} | {row['ms_per_forward']:.1f} "
            f"| {row['ms_per_step'] / plain:.2f} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for inversion_cost.json, .md and .png")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny model on the CPU (checks the script)")
    ap.add_argument("--steps", type=int, default=50, help="inversion schedule the timed steps come from")
    ap.add_argument("--timed", type=int, default=3, help="timed steps per variant, after one warm-up")
    ap.add_argument("--iters", default="0,1,2,3", help="variants: 0 is plain DDIM")
    args = ap.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny to check the script on the CPU")
    model, latent, embeds = build(args.tiny)
    results = {
        "device": torch.cuda.get_device_name(0) if latent.is_cuda else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "latent": list(latent.shape),
        "schedule_steps": args.steps,
        "timed": args.timed,
        "variants": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for iters in (int(i) for i in args.iters.split(",")):
        row = run_variant(model, latent, embeds, args.steps, iters, args.timed)
        results["variants"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "steps"}), flush=True)
        # Written after every variant: a run cut short keeps what it measured.
        (out / "inversion_cost.json").write_text(json.dumps(results, indent=1))
        (out / "inversion_cost.md").write_text(table(results))
    print(table(results))
    plot(results, out / "inversion_cost.png")


def plot(results: dict, path: Path) -> None:
    from benchmarks.plots import bar_chart

    rows = results["variants"]
    labels = ["plain DDIM" if r["iters"] == 0 else f"fixed point x{r['iters']}" for r in rows]
    bar_chart(labels, [r["ms_per_step"] / 1000 for r in rows], "s per inversion step", f"inversion step, full-size 5B, {results['device']}", path, [r["iters"] > 0 for r in rows])


if __name__ == "__main__":
    main()
