"""Transformer step speed on the GPU: which SDPA backend, regional torch.compile, CUDA graphs, FP8.

    python benchmarks/speed.py --out speed.json --variants default,compiled_blocks,compiled_cudagraphs,fp8,compiled_fp8

Builds the CogVideoX-5B transformer with random weights on the GPU (no disk) and times one
inversion forward (1 row) and one edit forward (2 edit rows + 1 shared reference row, injected
in every block) under each variant; median of repeats, as a fraction of the measured bf16
matmul peak. Informs issue 4; the engine's defaults change only on such evidence. The fp8
variants run last, on the model quantized as `--fp8` does. Each variant reports how far one
inversion forward's output moves from the eager bf16 model's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import matmul_peak_tflops, row_flops  # noqa: E402
from engine.hooks import registry as hooks  # noqa: E402
from engine.hooks.injection import CogVideoXAttnProcessor, InjectionState, KVInjectionConfig, apply_kv_injection, remove_kv_injection  # noqa: E402
from engine.models.components import quantize_float8  # noqa: E402
from engine.models.denoiser import predict, rotary_embeddings  # noqa: E402
from engine.models.tiny import random_transformer  # noqa: E402


def error(exc: BaseException) -> str:
    """One line for a variant that failed, with where it failed."""
    where = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__}: {str(exc)[:200]} (at {Path(where.filename).name}:{where.lineno})"


def timed(fn, reps: int) -> list[float]:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", default="default,cudnn,flash,efficient,compiled_blocks")
    args = ap.parse_args()
    wanted = args.variants.split(",")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = random_transformer("cuda")
    model.set_attn_processor(CogVideoXAttnProcessor())
    latents = torch.randn(1, 13, 16, 60, 90, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, 226, 4096, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor(500, device="cuda")
    rotary = rotary_embeddings(model, latents.shape, 8, "cuda")
    state = InjectionState(active=True, n_edit=2, ref_of=[0, 0])

    def invert_step():
        with torch.no_grad():
            return predict(model, latents, text, t, rotary)

    def edit_step():
        with torch.no_grad(), hooks.applied(model, apply_kv_injection, KVInjectionConfig(None, state), remove_kv_injection):
            predict(model, latents.expand(3, -1, -1, -1, -1), text.expand(3, -1, -1), t, rotary)

    peak = matmul_peak_tflops()
    from engine.models.model_info import builtin_5b
    from engine.models.plans import sequence_tokens

    tokens = sequence_tokens(builtin_5b(), 49, 480, 720)
    params = sum(p.numel() for p in model.parameters())
    flops = {"invert": row_flops(tokens, params, 42, 3072), "edit": 2 * row_flops(tokens, params, 42, 3072, 2) + row_flops(tokens, params, 42, 3072)}
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": date, "peak_tflops_bf16": peak, "flops": flops, "variants": {}}
    backends = {"default": None, "cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION], "efficient": [SDPBackend.EFFICIENT_ATTENTION]}

    reference_output = invert_step().float()

    def measure(name: str, backend=None) -> None:
        row = {}
        start = time.perf_counter()
        for phase, fn in (("invert", invert_step), ("edit", edit_step)):
            try:
                with sdpa_kernel(backend) if backend else contextlib.nullcontext():
                    times = timed(fn, args.reps)
                med = statistics.median(times)
                row[phase] = {"median_s": med, "times": times, "fraction_of_peak": flops[phase] / med / 1e12 / peak}
            except Exception as exc:
                row[phase] = {"error": error(exc)}
        row["first_calls_and_timing_s"] = time.perf_counter() - start
        # How far this variant moves one inversion forward's output from the eager bf16 model's.
        try:
            out = invert_step().float()
            row["invert_output_rel_l2"] = ((out - reference_output).norm() / reference_output.norm()).item()
        except Exception as exc:
            row["invert_output_error"] = error(exc)
        results["variants"][name] = row
        print(name, json.dumps(row)[:400], flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))

    for name in [n for n in wanted if n in backends]:
        measure(name, backends[name])
    # Regional compile: each block compiled once (same shapes every step); the compile time is
    # inside first_calls_and_timing_s. Variants run in the order given, each on top of the last.
    # CUDA graphs (reduce-overhead) replay each block's kernels without launching them from Python.
    modes = {"compiled_blocks": None, "compiled_autotune": "max-autotune-no-cudagraphs", "compiled_cudagraphs": "reduce-overhead"}
    for name in [n for n in wanted if n in modes]:
        torch._dynamo.reset()
        for block in model.transformer_blocks:
            block.compile(mode=modes[name])
        measure(name)
    if any("fp8" in n for n in wanted):
        # The same weights, uncompiled, quantized as --fp8 does (engine.models.components).
        torch._dynamo.reset()
        for block in model.transformer_blocks:
            block._compiled_call_impl = None
        quantize_float8(model)
        if "fp8" in wanted:
            measure("fp8")
        if "compiled_fp8" in wanted:
            for block in model.transformer_blocks:
                block.compile()
            measure("compiled_fp8")

if __name__ == "__main__":
    main()
