"""The attention kernels on the attention shapes of a CogVideoX-5B step (49x480x720: 17,776 tokens,
48 heads of 64), one call alone: torch's SDPA backends, FlashAttention-4 and SageAttention through
cogedit's own dispatch (engine.hooks.attention, the code the engine runs: FA4's injected calls as
two calls merged by their LSEs), what each costs, how far it lands from a float32 reference, and
(derived) how much of an inversion and an edit step attention is per kernel. Where a step's time
goes, not a speed claim (those come from benchmarks/e2e.py).

    python benchmarks/attention_kernels.py --out $OUT/attention_kernels.json       # on a GPU
    python benchmarks/attention_kernels.py --tiny --out /tmp/ak.json               # the harness, on a CPU
    python benchmarks/attention_kernels.py --report attention_kernels.json          # here: .md, .png

FA4 needs `flash_attn.cute` (pip install -e ".[fast]"), Sage `sageattention` (".[sage]"); a kernel
that is not installed or does not run on the GPU is a row with its error.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.hooks.attention import attend, attend_lse, choose_kernel, merge  # noqa: E402
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
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
# Every kernel with a figure for each shape (the per-step table), then FA4 on the joined keys in one call.
KERNELS = (*BACKENDS, "fa4", "sage")
EXTRA = ("fa4-joined",)


def _sdpa(backend: SDPBackend) -> Callable:
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _engine(kernel: str, shape: str) -> Callable:
    """The engine's call for `shape` (q, k, v [B, heads, tokens, dim], k/v joined for injected)."""
    if kernel == "fa4" and shape == "injected":  # what engine.hooks.injection runs: each half apart, merged

        def run(q, k, v):
            half = k.shape[2] // 2
            own, ref = (attend_lse(q, k[:, :, s], v[:, :, s], "fa4") for s in (slice(None, half), slice(half, None)))
            return merge(own, ref, 1.0).transpose(1, 2)

        return run
    name = kernel.removesuffix("-joined")
    return lambda q, k, v: attend(q, k, v, name).transpose(1, 2)


def kernel_call(kernel: str, shape: str) -> Callable:
    return _sdpa(BACKENDS[kernel]) if kernel in BACKENDS else _engine(kernel, shape)


def timed(fn: Callable, qkv: tuple[torch.Tensor, ...], repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of one attention call, after two warm-up calls (FA4 and Sage compile their kernels in the first)."""
    fn(*qkv), fn(*qkv)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn(*qkv)
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _runs_here(kernel: str, device: str) -> None:
    """Raise (RuntimeError) for a kernel this machine cannot run: the engine's own check, one line."""
    name = kernel.removesuffix("-joined")
    if name in ("fa4", "sage"):
        try:
            choose_kernel(name, device, torch.bfloat16)
        except Exception as exc:
            raise RuntimeError(str(exc)) from None


def measure(repeats: int, tokens: int = TOKENS, heads: int = HEADS, device: str = "cuda") -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = {}
    for name, batch, h, keys in SHAPES:
        h, keys = min(h, heads), keys * tokens // TOKENS
        q = torch.randn(batch, h, tokens, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=g)
        k = torch.randn(batch, h, keys, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        # The reference: one head in float32 (the whole would not fit the math kernel's memory).
        one = [x[:1, :1].contiguous() for x in (q, k, v)]
        ref = F.scaled_dot_product_attention(*(x.float() for x in one))
        flops = 4 * batch * h * tokens * keys * HEAD_DIM
        for kernel in (*KERNELS, *(EXTRA if name == "injected" else ())):
            fn = kernel_call(kernel, name)
            try:
                _runs_here(kernel, device)
                seconds = timed(fn, (q, k, v), repeats, sync)
                out = fn(*one).float()
            except (RuntimeError, AssertionError, NotImplementedError) as e:  # a kernel this machine, GPU or shape doesn't have
                rows[f"{name}/{kernel}"] = {"error": str(e).splitlines()[0][:200]}
                continue
            err = (out - ref).abs()
            rows[f"{name}/{kernel}"] = {"ms": 1e3 * seconds, "tflops": flops / seconds / 1e12, "max_abs_err_vs_fp32": err.max().item(), "mean_abs_err_vs_fp32": err.mean().item()}
            print(name, kernel, rows[f"{name}/{kernel}"], flush=True)
    return rows


def attention_per_step(kernels: dict, kernel: str) -> dict[str, float]:
    """Seconds of attention in an inversion and in an edit step with `kernel` (derived)."""
    return {step: sum(n * kernels[f"{shape}/{kernel}"]["ms"] / 1e3 for shape, n in calls.items()) for step, calls in CALLS_PER_STEP.items()}


def _error_ratios(k: dict) -> list[str]:
    """Each kernel's error against cuDNN's on the same shape (FA4's target: within 1.2x)."""
    out = []
    for shape, *_ in SHAPES:
        base = k.get(f"{shape}/cudnn", {}).get("max_abs_err_vs_fp32")
        for kernel in ("fa4", "sage", *EXTRA):
            row = k.get(f"{shape}/{kernel}", {})
            if base and "max_abs_err_vs_fp32" in row:
                out.append(f"- {shape}, {kernel}: error {row['max_abs_err_vs_fp32'] / base:.2f}x cuDNN's (max), mean {row['mean_abs_err_vs_fp32']:.1e}")
    return ["", "Errors against cuDNN's (the injected fa4 row is the engine's two calls merged by their LSEs; fa4-joined one call over the joined keys):", "", *out] if out else []


def report(path: Path, step_s: dict[str, float]) -> None:
    """attention_kernels.{json,md,png} in benchmarks/results from a run's JSON; `step_s` are the
    measured median steps of the same phases (benchmarks/results/E2E.md) to compare with."""
    from benchmarks.plots import bar_chart

    run = json.loads(path.read_text())
    k = run["kernels"]
    ok = [name for name in KERNELS if all("ms" in k.get(f"{shape}/{name}", {}) for shape, *_ in SHAPES)]
    lines = ["# Attention kernels on the 5B's shapes", "",
             f"{run['device']}, torch {run['torch']}, cuDNN {run['cudnn']}, {run['date']}. `{run['command']}`: one call at a time, median of 10, bf16;",
             "error: largest absolute difference from float32 on one head. Shapes: " + "; ".join(
                 f"{n}: {s['rows']} row(s) x {s['heads']} heads, {s['queries']} queries, {s['keys']} keys" for n, s in run["shapes"].items()) + ".", "",
             "| shape | kernel | ms per call | TFLOP/s | error vs fp32 |", "|---|---|---|---|---|"]
    for name, row in k.items():
        shape, kernel = name.split("/")
        lines.append(f"| {shape} | {kernel} | {row['ms']:.2f} | {row['tflops']:.0f} | {row['max_abs_err_vs_fp32']:.1e} |" if "ms" in row else f"| {shape} | {kernel} | - | - | {row['error']} |")
    lines += _error_ratios(k)
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
    ap.add_argument("--tiny", action="store_true", help="256 tokens, 8 heads, on the CPU: checks the harness")
    args = ap.parse_args()
    if args.report:
        report(args.report, {k: float(v) for k, v in (s.split("=") for s in args.step)})
        return
    tokens, heads, device = (256, 8, "cpu") if args.tiny else (TOKENS, HEADS, "cuda")
    result = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu", "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": " ".join(["python benchmarks/attention_kernels.py", *sys.argv[1:]]),
              "shapes": {n: {"rows": b, "heads": min(h, heads), "queries": tokens, "keys": k * tokens // TOKENS, "head_dim": HEAD_DIM} for n, b, h, k in SHAPES},
              "kernels": measure(args.repeats, tokens, heads, device)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
