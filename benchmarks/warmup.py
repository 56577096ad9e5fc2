"""What `--compile` (and `--compile --fp8`) costs before its first step, cold and with warm caches.

Each variant runs in a fresh process, as a user's next command would: build the full-size
CogVideoX-5B transformer (random bf16 weights), place it as the engine does
(`engine.models.components.place_component`), then time one inversion-sized forward after another
(1 row, 49x480x720). Warm-up = first forward - median of the later ones. Variants:

- eager: no compile (the baseline's own first-forward cost)
- compile-cold: empty inductor/Triton caches, no cogedit artifacts (a first run)
- compile-artifacts: empty inductor/Triton caches, cogedit's saved artifacts loaded (a new machine
  or a wiped /tmp, the cache copied along)
- compile-warm: the cold run's inductor/Triton caches and the artifacts (the same machine, next run)
and the same three with --fp8 when torchao is there.

    python benchmarks/warmup.py --out DIR [--forwards 4] [--tiny]     # measure (GPU)
    python benchmarks/warmup.py --report benchmarks/results/warmup.json  # WARMUP.md + warmup.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(args: argparse.Namespace) -> dict:
    import torch

    from engine.models.compile_cache import artifacts_path, compile_artifacts
    from engine.models.components import Runtime, place_component
    from engine.models.configs import TRANSFORMER_5B
    from engine.models.denoiser import predict, rotary_embeddings
    from engine.models.tiny import random_transformer

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tiny = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "text_embed_dim": 32, "time_embed_dim": 16} if args.tiny else {}
    config = {**TRANSFORMER_5B, **tiny}
    start = time.perf_counter()
    model = random_transformer(device, torch.bfloat16 if cuda else torch.float32, **tiny)
    runtime = Runtime.default(device, compile=args.compile, fp8=args.fp8)
    model = place_component(model, "transformer", runtime)
    built = time.perf_counter() - start
    shape = (1, 3, 16, 12, 18) if args.tiny else (1, 13, 16, 60, 90)
    latents = torch.randn(shape, device=device, dtype=runtime.dtype)
    text = torch.randn(1, 226, config["text_embed_dim"], device=device, dtype=runtime.dtype)
    rotary = rotary_embeddings(model, latents.shape, 8, device)
    times = []
    kept = compile_artifacts(artifacts_path(Path(args.compile_dir), runtime, config)) if args.compile else None
    if kept is not None:
        load_start = time.perf_counter()
        kept.__enter__()
        load_s = time.perf_counter() - load_start
    with torch.no_grad():
        for i in range(args.forwards):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            predict(model, latents, text, torch.tensor(999 - 100 * i), rotary)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    save_s = 0.0
    if kept is not None:
        save_start = time.perf_counter()
        kept.__exit__(None, None, None)
        save_s = time.perf_counter() - save_start
    steady = statistics.median(times[1:])
    return {
        "build_s": built, "first_forward_s": times[0], "steady_forward_s": steady, "warmup_s": times[0] - steady,
        "artifacts_load_s": load_s if kept is not None else 0.0, "artifacts_save_s": save_s, "forwards": times,
    }


def run_variant(name: str, compile: bool, fp8: bool, caches: Path, compile_dir: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TRITON_CACHE_DIR": str(caches / "triton"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, __file__, "--child", "--forwards", str(args.forwards), "--compile-dir", str(compile_dir)]
    cmd += ["--compile"] * compile + ["--fp8"] * fp8 + ["--tiny"] * args.tiny
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"variant": name, "ok": False, "error": done.stderr[-2000:], "wall_s": wall}
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {"variant": name, "ok": True, "process_wall_s": wall, **row}


def report(path: Path) -> None:
    """WARMUP.md (a table) and warmup.png (a bar chart) beside the JSON."""
    from benchmarks.plots import bar_chart

    result = json.loads(path.read_text())
    rows = [r for r in result["rows"] if r["ok"]]
    lines = [
        "# --compile warm-up, cold and with warm caches",
        "",
        f"{result['device']}, torch {result['torch']}, {result['date']}; full-size CogVideoX-5B transformer (random bf16 weights),",
        f"{result['shape']}; each variant in a fresh process; warm-up = first forward - median of the next three.",
        "Made by `python benchmarks/warmup.py --out DIR --forwards 4` on the GPU, rendered by",
        "`python benchmarks/warmup.py --report benchmarks/results/warmup.json`.",
        "",
        "| variant | first forward s | steady forward s | warm-up s | steady vs eager |",
        "|---|---|---|---|---|",
    ]
    eager = {r["variant"]: r["steady_forward_s"] for r in rows if r["variant"].startswith("eager")}
    for r in rows:
        base = eager.get("eager")
        lines.append(f"| {r['variant']} | {r['first_forward_s']:.2f} | {r['steady_forward_s']:.3f} | {r['warmup_s']:.2f} | {r['steady_forward_s'] / base:.2f}x |")
    (path.parent / "WARMUP.md").write_text("\n".join(lines) + "\n")
    labels = [r["variant"] for r in rows]
    compiled = [not label.startswith("eager") for label in labels]
    bar_chart(labels, [r["warmup_s"] for r in rows], "warm-up before the first step (s)", f"--compile warm-up, {result['device']}", path.parent / "warmup.png", compiled)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path, help="render a warmup.json into WARMUP.md and warmup.png")
    parser.add_argument("--forwards", type=int, default=4)
    parser.add_argument("--tiny", action="store_true", help="a toy transformer, for a CPU check of the script")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--compile-dir", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.report:
        report(args.report)
        return
    import torch

    try:
        import torchao  # noqa: F401

        fp8s = [False, True] if torch.cuda.is_available() else [False]
    except ImportError:
        fp8s = [False]
    rows = []
    work = Path(tempfile.mkdtemp())
    for fp8 in fp8s:
        tag = "-fp8" if fp8 else ""
        cold, fresh, compile_dir = work / f"cold{tag}", work / f"fresh{tag}", work / f"cogedit{tag}"
        plan = [(f"eager{tag}", False, cold if not fp8 else work / "eager-fp8"), (f"compile{tag}-cold", True, cold), (f"compile{tag}-artifacts", True, fresh), (f"compile{tag}-warm", True, cold)]
        for name, compile, caches in plan:
            row = run_variant(name, compile, fp8, caches, compile_dir, args)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "forwards"}), flush=True)
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "shape": "1 row, 49x480x720 (13x60x90 latents)" if not args.tiny else "tiny",
        "rows": rows,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "warmup.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
