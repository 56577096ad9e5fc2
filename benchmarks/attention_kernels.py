"""torch's SDPA kernels on the attention shapes of a CogVideoX-5B step (49x480x720: 17,776
tokens, 48 heads of 64), one call alone: what each kernel costs, how far it lands from a float32
reference, and (derived) how much of an inversion and an edit step attention is with the kernel
torch picks. Where a step's time goes, not a speed claim (those come from benchmarks/e2e.py).

    python benchmarks/attention_kernels.py --out $OUT/attention_kernels.json       # on a GPU
    python benchmarks/attention_kernels.py --report attention_kernels.json          # here: .md, .png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.hooks.injection import INJECT_HEADS  # noqa: E402

TOKENS, HEADS, HEAD_DIM = 17_776, 48, 64
# (name, rows, heads per call, key length): the inversion's and a reference row's self-attention,
# and an edit row's attention over its own keys joined with the reference's, 8 heads per call
# (engine.hooks.injection.INJECT_HEADS), for the two CFG rows of one prompt.
SHAPES = (("self", 1, HEADS, TOKENS), ("injected", 2, INJECT_HEADS, 2 * TOKENS))
LAYERS = 42
# Per step (engine.hooks.injection): an inversion step is one self-attention row per block; an
# edit step (one prompt, CFG) is the reference row's self-attention and the two edit rows over the
# joined keys, 48 / 8 calls of 8 heads per block.
CALLS_PER_STEP = {"invert": {"self": LAYERS}, "edit": {"self": LAYERS, "injected": LAYERS * HEADS // INJECT_HEADS}}
RESULTS = Path(__file__).resolve().parent / "results"
KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}


def timed(qkv: tuple[torch.Tensor, ...], repeats: int) -> float:
    """Median seconds of one attention call, after two warm-up calls."""
    F.scaled_dot_product_attention(*qkv), F.scaled_dot_product_attention(*qkv)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        F.scaled_dot_product_attention(*qkv)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(repeats: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = {}
    for name, batch, heads, keys in SHAPES:
        q = torch.randn(batch, heads, TOKENS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(batch, heads, keys, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        # The reference: one head in float32 (the whole would not fit the math kernel's memory).
        one = [x[:1, :1].contiguous() for x in (q, k, v)]
        ref = F.scaled_dot_product_attention(*(x.float() for x in one))
        flops = 4 * batch * heads * TOKENS * keys * HEAD_DIM
        for kernel, backend in KERNELS.items():
            try:
                with sdpa_kernel(backend):
                    seconds = timed((q, k, v), repeats)
                    out = F.scaled_dot_product_attention(*one).float()
            except RuntimeError as e:  # a kernel this GPU or shape doesn't have
                rows[f"{name}/{kernel}"] = {"error": str(e).splitlines()[0][:200]}
                continue
            rows[f"{name}/{kernel}"] = {"ms": 1e3 * seconds, "tflops": flops / seconds / 1e12, "max_abs_err_vs_fp32": (out - ref).abs().max().item()}
            print(name, kernel, rows[f"{name}/{kernel}"], flush=True)
    return rows


def attention_per_step(kernels: dict, kernel: str) -> dict[str, float]:
    """Seconds of attention in an inversion and in an edit step with `kernel` (derived)."""
    return {step: sum(n * kernels[f"{shape}/{kernel}"]["ms"] / 1e3 for shape, n in calls.items()) for step, calls in CALLS_PER_STEP.items()}


def report(path: Path, step_s: dict[str, float]) -> None:
    """attention_kernels.{json,md,png} in benchmarks/results from a run's JSON; `step_s` are the
    measured median steps of the same phases (benchmarks/results/E2E.md) to compare with."""
    from benchmarks.plots import bar_chart

    run = json.loads(path.read_text())
    k = run["kernels"]
    ok = [name for name in KERNELS if all("ms" in k.get(f"{shape}/{name}", {}) for shape, *_ in SHAPES)]
    lines = ["# Attention kernels on the 5B's shapes", "",
             f"{run['device']}, torch {run['torch']}, cuDNN {run['cudnn']}, {run['date']}. `{run['command']}`: one SDPA call at a time, median of 10, bf16;",
             "error: largest absolute difference from float32 on one head. Shapes: " + "; ".join(
                 f"{n}: {s['rows']} row(s) x {s['heads']} heads, {s['queries']} queries, {s['keys']} keys" for n, s in run["shapes"].items()) + ".", "",
             "| shape | kernel | ms per call | TFLOP/s | error vs fp32 |", "|---|---|---|---|---|"]
    for name, row in k.items():
        shape, kernel = name.split("/")
        lines.append(f"| {shape} | {kernel} | {row['ms']:.2f} | {row['tflops']:.0f} | {row['max_abs_err_vs_fp32']:.1e} |" if "ms" in row else f"| {shape} | {kernel} | - | - | {row['error']} |")
    lines += ["", "Attention per step (derived: calls per step x ms per call) against the measured median step of the default (E2E.md):", "",
              "| step | " + " | ".join(f"{n} s" for n in ok) + " | measured step s | share with cudnn |", "|---|" + "---|" * (len(ok) + 2)]
    per = {name: attention_per_step(k, name) for name in ok}
    for step, measured in step_s.items():
        lines.append(f"| {step} | " + " | ".join(f"{per[n][step]:.2f}" for n in ok) + f" | {measured:.2f} | {per['cudnn'][step] / measured:.0%} |")
    lines += ["", "torch 2.11 with cuDNN > 9.15 already tries cuDNN first on Hopper (`check_prefer_cudnn_attention` in ATen's sdp_utils.cpp): asking",
              "for that order by hand changed nothing end to end (edit 2.93 s/step with torch's order, 2.94 with cuDNN first; invert 0.86 both; H200, the",
              "same e2e run)."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "attention_kernels.json").write_text(json.dumps({**run, "attention_per_step_s": per, "measured_step_s": step_s}, indent=1))
    (RESULTS / "attention_kernels.md").write_text("\n".join(lines) + "\n")
    labels = [f"{step} / {n}" for step in step_s for n in ok] + [f"{step} / measured step" for step in step_s]
    values = [per[n][step] for step in step_s for n in ok] + list(step_s.values())
    bar_chart(labels, values, "seconds per step", f"attention per step (derived), {run['device']}", RESULTS / "attention_kernels.png",
              [not label.endswith("measured step") for label in labels])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--report", type=Path, help="a run's JSON -> benchmarks/results/attention_kernels.{json,md,png}")
    ap.add_argument("--step", action="append", default=[], metavar="PHASE=S", help="with --report: the measured median step of a phase (repeatable)")
    args = ap.parse_args()
    if args.report:
        report(args.report, {k: float(v) for k, v in (s.split("=") for s in args.step)})
        return
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": "python benchmarks/attention_kernels.py",
              "shapes": {n: {"rows": b, "heads": h, "queries": TOKENS, "keys": k, "head_dim": HEAD_DIM} for n, b, h, k in SHAPES},
              "kernels": measure(args.repeats)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
