"""Where a transformer forward's peak GPU memory goes: the live allocations at the peak.

    python benchmarks/peak.py --out peak.json --rows 3 --row-group 1 --ff-chunk 2048

Builds the CogVideoX-5B transformer with random weights on the GPU (no disk), runs one edit
forward (edit rows + a shared reference row, injected in every block) with the given row
groups and MLP slicing, records the allocator's history (torch.cuda.memory._record_memory_history)
and replays it to the moment of the peak: which tensors, allocated where, were alive then.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.hooks import registry as hooks  # noqa: E402
from engine.hooks.ff_chunking import FFChunkingConfig, apply_ff_chunking  # noqa: E402
from engine.hooks.injection import CogVideoXAttnProcessor, InjectionState, KVInjectionConfig, apply_kv_injection, remove_kv_injection  # noqa: E402
from engine.hooks.row_groups import RowGroupConfig, apply_row_groups, remove_row_groups  # noqa: E402
from engine.models.configs import TRANSFORMER_5B  # noqa: E402
from engine.models.denoiser import predict, rotary_embeddings  # noqa: E402

GiB = 1 << 30


def live_at_peak(trace: list[dict]) -> tuple[int, list[dict]]:
    """Replay alloc/free events; the bytes above the start and the allocations alive at the peak."""
    live: dict[int, dict] = {}
    total = best = 0
    best_live: list[dict] = []
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
            if total > best:
                best, best_live = total, list(live.values())
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]
    return best, best_live


def where(ev: dict) -> str:
    frames = [f for f in ev.get("frames", []) if "/diffusers/" in f["filename"] or "/engine/" in f["filename"] or "torch/nn/functional" in f["filename"]]
    return " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames[:3]) or "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=3, help="rows in the batch, the last one the shared reference")
    ap.add_argument("--row-group", type=int, default=1)
    ap.add_argument("--ff-chunk", type=int, default=2048)
    args = ap.parse_args()
    from diffusers import CogVideoXTransformer3DModel

    with torch.device("cuda"):
        model = CogVideoXTransformer3DModel(**TRANSFORMER_5B).to(torch.bfloat16).eval().requires_grad_(False)
    model.set_attn_processor(CogVideoXAttnProcessor())
    if args.ff_chunk:
        apply_ff_chunking(model, FFChunkingConfig(args.ff_chunk))
    latents = torch.randn(args.rows, 13, 16, 60, 90, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(args.rows, 226, 4096, device="cuda", dtype=torch.bfloat16)
    rotary = rotary_embeddings(model, latents.shape, 8, "cuda")
    state = InjectionState(active=True, n_edit=args.rows - 1, ref_of=torch.zeros(args.rows - 1, dtype=torch.long, device="cuda"))

    def forward() -> None:
        injected = hooks.applied(model, apply_kv_injection, KVInjectionConfig(None, state), remove_kv_injection)
        grouped = hooks.applied(model, apply_row_groups, RowGroupConfig(args.row_group, state), remove_row_groups) if args.row_group else contextlib.nullcontext()
        with torch.no_grad(), injected, grouped:
            predict(model, latents, text, torch.tensor(500), rotary)

    forward()  # warm-up: kernels, workspaces
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    forward()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    above, alive = live_at_peak([ev for trace in snapshot["device_traces"] for ev in trace])
    alive.sort(key=lambda ev: -ev["size"])
    result = {
        "device": torch.cuda.get_device_name(0),
        "args": vars(args),
        "resident_gib": base / GiB,
        "peak_gib": torch.cuda.max_memory_allocated() / GiB,
        "peak_above_resident_gib": above / GiB,
        "alive_at_peak": [{"mib": ev["size"] / (1 << 20), "where": where(ev)} for ev in alive[:25]],
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1)[:6000])


if __name__ == "__main__":
    main()
