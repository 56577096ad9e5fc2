"""torch's SDPA kernels on the attention shapes of a CogVideoX-5B step (49x480x720: 17,776
tokens, 48 heads of 64), one forward alone: what each kernel costs and how far it lands from a
float32 reference. It explains `engine.models.denoiser.CUDNN_FIRST`; the default itself is chosen
from benchmarks/e2e.py's end-to-end runs (variants cold and flash).

    python benchmarks/attention_kernels.py --out $OUT/attention_kernels.json     # on a GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

TOKENS, HEADS, HEAD_DIM = 17_776, 48, 64
# (name, rows, heads per call, key length): the inversion's and a reference row's self-attention,
# and an edit row's attention over its own keys joined with the reference's, 8 heads per call
# (engine.hooks.injection.INJECT_HEADS), for the two CFG rows of one prompt.
SHAPES = (("self", 1, HEADS, TOKENS), ("injected", 2, 8, 2 * TOKENS))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": "python benchmarks/attention_kernels.py",
              "shapes": {n: {"rows": b, "heads": h, "queries": TOKENS, "keys": k, "head_dim": HEAD_DIM} for n, b, h, k in SHAPES},
              "kernels": measure(args.repeats)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
