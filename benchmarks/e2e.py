"""The end-to-end speed a user gets: the one source of cogedit's speed claims (issue 17).

Every variant runs in a fresh process, as a user's next command would, and times the real
`engine.invert` and `engine.edit(output="frames")` calls (wall clock), with their phases from
`engine.report` (load and warm-up before the first step, the steps, decode) and peak VRAM. The
model is the full-size CogVideoX-5B architecture with random bf16 weights, written once per
machine and reused; the clip is 49x480x720.

    # on the GPU: measure, writing JSON (and each variant's log) under OUT
    python benchmarks/e2e.py run --out $OUT/e2e-a.json --variants upstream,cold,warm --steps 50 --budget 560
    # here: JSON(s) -> benchmarks/results/E2E.md, e2e.json, e2e.png
    python benchmarks/e2e.py report e2e-a.json e2e-b.json

Variants (`--variants`, comma-separated, run in the order given):
- upstream: the upstream method (benchmarks/upstream.py, everything resident, CFG rows) timed over
  `--upstream-steps` steps of a 50-step schedule and EXTRAPOLATED to 50 steps (labelled so)
- cold: the defaults, empty kernel and cogedit caches; invert, edit, then a further edit from the cache
- warm: the defaults in a second process with cold's cache folders and a new inversion (run cold first)
- nocompile: --no-compile; fp8: --fp8 (cold kernel cache); 4prompts: 4 prompts in one pass
Each cogedit call runs `--steps` steps; with fewer than 50 the report gives the measured wall clock
and, labelled extrapolated, the same call with 50 steps (fixed costs + 50 x the median step).
A variant whose estimated time does not fit what is left of `--budget` is not started, and is
recorded as skipped. Each variant's log is grepped for dynamo's "recompile_limit".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIP = ROOT / "benchmarks" / "clip49.mp4"
FULL = dict(frames=49, height=480, width=720)
TINY = dict(frames=9, height=96, width=160)
PROMPTS = ("a watercolor painting", "a charcoal sketch at night", "a snowy winter scene", "a neon cyberpunk city")
SCHEDULE = 50  # the steps every figure is given for
# Kernel/cogedit cache folder of each variant, and its options; warm reuses cold's folder.
VARIANTS: dict[str, dict[str, Any]] = {
    "cold": {"cache": "default", "fresh": True, "options": {}, "prompts": 1, "further": True},
    "warm": {"cache": "default", "fresh": False, "options": {}, "prompts": 1, "further": True, "new_inversion": True},
    "nocompile": {"cache": "nocompile", "fresh": True, "options": {"compile": False}, "prompts": 1, "further": False},
    "fp8": {"cache": "fp8", "fresh": True, "options": {"fp8": True}, "prompts": 1, "further": True},
    "fp8-warm": {"cache": "fp8", "fresh": False, "options": {"fp8": True}, "prompts": 1, "further": True, "new_inversion": True},
    "4prompts": {"cache": "4prompts", "fresh": True, "options": {}, "prompts": 4, "further": False},
}
# Seconds a variant is expected to take on an H200, (fixed, per step of --steps), what the time
# guard compares with what is left. From issue 17's runs at main (eager: invert 58.5 s = ~15 s
# fixed + 50 x 0.9 s, edit 187.6 s = ~27 s fixed + 50 x 3.2 s), plus ~15 s to start a process
# and ~50 s of compiling in a cold cache; fp8 steps ~10% faster, 4 prompts ~8.5 s per edit step.
ESTIMATE = {"upstream": (100, 0), "cold": (135, 7.3), "warm": (100, 7.3), "nocompile": (60, 4.1), "fp8": (145, 6.6), "fp8-warm": (105, 6.6), "4prompts": (110, 9.4)}
RECOMPILE_MARK = "recompile_limit"


# ---------------------------------------------------------------- the model, once per machine


def model_path(workdir: Path, tiny: bool) -> Path:
    """The random-weight checkpoint under `workdir`, written by the first process that needs it
    (a file lock: the two GPUs' commands share it)."""
    from filelock import FileLock

    import engine

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


# ---------------------------------------------------------------- one variant (a child process)


def _timed_call(fn, reporter, sync: bool) -> dict:
    """Wall clock of one engine call, its phases, step times and peak memory."""
    import torch

    marks: list[float] = []

    def callback(state: dict) -> None:
        if sync:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    first_record = len(reporter.records)
    if sync:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn(callback)
    wall = time.perf_counter() - start
    records = reporter.records[first_record:]
    steps = [b - a for a, b in zip(marks, marks[1:])]
    median = statistics.median(steps) if steps else 0.0
    phases = {r.name: {"seconds": r.seconds, "peak_bytes": r.peak_bytes, "cache_hit": r.cache_hit} for r in records}
    stepped = next((r for r in records if r.name in ("invert", "edit") and r.cache_hit is not True), None)
    out = {"wall_s": wall, "steps": len(marks), "step_times": steps, "median_step_s": median, "phases": phases}
    if stepped is not None and marks:
        before = sum(r.seconds for r in records[: records.index(stepped)])
        # Loading the transformer and compiling it: up to the first step's end, less one steady step.
        out["before_first_step_s"] = marks[0] - start - before - median
        out["steps_s"] = marks[-1] - marks[0] + median
    out["peak_vram_bytes"] = torch.cuda.max_memory_allocated() if sync else max((r.peak_bytes for r in records), default=0)
    return out


def _clip(tiny: bool) -> Path:
    from engine.video.clips import DEMO_VIDEO

    return DEMO_VIDEO if tiny else CLIP


def child(args: argparse.Namespace) -> dict:
    import torch

    import engine
    from engine.models.components import Runtime

    spec = VARIANTS[args.variant]
    cuda = torch.cuda.is_available()
    size = TINY if args.tiny else FULL
    clip = _clip(args.tiny)
    cache_dir = Path(args.cache)
    reporter = engine.Reporter(device="cuda" if cuda else "cpu")
    options = {**spec["options"], "cache_dir": cache_dir, "reporter": reporter}
    invert_kw = dict(steps=args.steps, **size, **({"fit": "crop"} if spec.get("new_inversion") else {}))
    compiled = {phase: Runtime.default(**spec["options"], phase=phase).compile for phase in ("invert", "edit")}
    prompts = list(PROMPTS[: spec["prompts"]])
    row = {"calls": {}, "prompts": len(prompts), "compiled": compiled, "fp8": spec["options"].get("fp8", False), "steps": args.steps}
    inv: list = []
    calls = {"invert": lambda cb: inv.append(engine.invert(clip, args.model, callback=cb, **invert_kw, **options)),
             "edit": lambda cb: engine.edit(inv[0], prompts, output="frames", callback=cb, **options)}
    if spec["further"]:
        calls["further_edit"] = lambda cb: engine.edit(inv[0], [PROMPTS[1]], output="frames", callback=cb, **options)
    for name, call in calls.items():
        row["calls"][name] = _timed_call(call, reporter, cuda)
        Path(args.result).write_text(json.dumps(row, default=str))  # what finished survives the time guard
    return row


def upstream_child(args: argparse.Namespace) -> dict:
    """The upstream method's phases, its steps timed over `--upstream-steps` of a 50-step schedule."""
    import torch

    from benchmarks.upstream import run_upstream
    from engine.models.components import Runtime
    from engine.models.model_info import inspect_model
    from engine.video.reader import FrameSettings, read_frames, to_model_input

    size = TINY if args.tiny else FULL
    frames, _ = read_frames(_clip(args.tiny), FrameSettings(size["frames"], height=size["height"], width=size["width"]))
    start = time.perf_counter()
    phases = run_upstream(inspect_model(args.model), Runtime.default(compile=False), to_model_input(frames), SCHEDULE, "resident", timed=args.upstream_steps)
    wall = time.perf_counter() - start
    peak = max((p.get("peak_alloc", 0) for p in phases.values()), default=0)
    fixed = sum(p["seconds"] for name, p in phases.items() if name not in ("invert", "edit"))
    per_step = {name: statistics.median(phases[name]["step_times"]) for name in ("invert", "edit")}
    # Extrapolated: the fixed phases as measured, the two loops at 50 x their median step.
    total = fixed + SCHEDULE * (per_step["invert"] + per_step["edit"])
    return {"phases": phases, "measured_wall_s": wall, "timed_steps": args.upstream_steps, "per_step_s": per_step, "fixed_s": fixed,
            "extrapolated_total_s": total, "peak_vram_bytes": peak if torch.cuda.is_available() else 0}


# ---------------------------------------------------------------- the parent: variants, guard, JSON


def _estimate(name: str, steps: int) -> float:
    fixed, per_step = ESTIMATE[name]
    return fixed + per_step * steps


def run_variant(name: str, args: argparse.Namespace, model: Path, work: Path, logs: Path, left: float) -> dict:
    spec = VARIANTS.get(name, {"cache": "upstream", "fresh": True})
    caches = work / "caches" / spec["cache"]
    if spec["fresh"]:
        shutil.rmtree(caches, ignore_errors=True)
    caches.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TRITON_CACHE_DIR": str(caches / "triton"), "PYTHONUNBUFFERED": "1"}
    result = work / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", "--variant", name, "--model", str(model), "--cache", str(caches / "cogedit"),
           "--steps", str(args.steps), "--upstream-steps", str(args.upstream_steps), "--result", str(result)] + ["--tiny"] * args.tiny
    log = logs / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        try:
            done = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=max(1.0, left), cwd=ROOT)
            rc = done.returncode
        except subprocess.TimeoutExpired:
            rc = None
    text = log.read_text(errors="replace")
    row: dict[str, Any] = {"process_wall_s": time.perf_counter() - start, "log": log.name, "recompile_limit_hits": text.count(RECOMPILE_MARK)}
    if rc is None:
        done = json.loads(result.read_text()) if result.exists() else {}
        return {**row, **done, "ok": False, "error": f"killed by the time guard after {', '.join(done.get('calls', {})) or 'no call'}"}
    if rc != 0 or not result.exists():
        return {**row, "ok": False, "error": text.strip().splitlines()[-1][:300] if text.strip() else f"exit {rc}"}
    return {**row, "ok": True, **json.loads(result.read_text())}


def environment() -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("diffusers", "transformers", "torchao"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu", "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    out = Path(args.out)
    logs = out.parent / (out.stem + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir)
    model = model_path(work, args.tiny)
    results = {**environment(), "command": " ".join(["python", "benchmarks/e2e.py", *sys.argv[1:]]), "steps": args.steps,
               "schedule": SCHEDULE, "workload": TINY if args.tiny else FULL, "model_ready_s": time.perf_counter() - start,
               "budget_s": args.budget, "variants": {}, "skipped": {}}
    for name in [v for v in args.variants.split(",") if v]:
        if name != "upstream" and name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: choose from upstream, {', '.join(VARIANTS)}")
        left = args.budget - (time.perf_counter() - start)
        need = _estimate(name, args.steps) * args.estimate_scale
        if need > left:
            results["skipped"][name] = f"estimated {need:.0f} s, {left:.0f} s left of the {args.budget:.0f} s budget"
        else:
            results["variants"][name] = run_variant(name, args, model, work, logs, left)
        print(name, json.dumps(results["variants"].get(name) or results["skipped"][name], default=str)[:600], flush=True)
        out.write_text(json.dumps(results, indent=1, default=str))
    results["wall_s"] = time.perf_counter() - start
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {out} in {results['wall_s']:.0f} s")


# ---------------------------------------------------------------- the report (here, from the JSON)


def at_schedule(call: dict, steps: int) -> float:
    """A call's wall clock with SCHEDULE steps: measured when it ran that many, else its fixed
    costs plus SCHEDULE x its median step (extrapolated)."""
    if steps == SCHEDULE or not call.get("median_step_s"):
        return call["wall_s"]
    return call["wall_s"] + (SCHEDULE - call["steps"]) * call["median_step_s"]


def summarize(results: dict) -> dict:
    """Per variant, the 50-step times of invert, first edit (invert + edit), further edit, and
    their ratio to the upstream method's extrapolated 50-step run."""
    variants = results["variants"]
    up = variants.get("upstream", {})
    upstream = up.get("extrapolated_total_s") if up.get("ok") else None
    rows = {}
    for name, row in variants.items():
        if name == "upstream" or not row.get("ok"):
            continue
        steps = row["steps"]
        calls = row["calls"]
        invert, edit = at_schedule(calls["invert"], steps), at_schedule(calls["edit"], steps)
        prompts = row["prompts"]
        first = (invert + edit) / prompts
        further = at_schedule(calls["further_edit"], steps) if "further_edit" in calls else None
        rows[name] = {
            "invert_s": invert, "edit_s": edit, "first_edit_s": first, "further_edit_s": further, "prompts": prompts,
            "extrapolated": steps != SCHEDULE,
            "first_vs_upstream": first / upstream if upstream else None,
            "further_vs_upstream": further / upstream if upstream and further else None,
            "peak_vram_gib": max(c["peak_vram_bytes"] for c in calls.values()) / 2**30,
            "recompile_limit_hits": row["recompile_limit_hits"],
        }
    return {"upstream_s": upstream, "rows": rows}


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def report(paths: list[Path], out_dir: Path) -> None:
    """Merge run JSONs (one per GPU command) into e2e.json, and render E2E.md and e2e.png."""
    from benchmarks.plots import bar_chart

    runs = [json.loads(p.read_text()) for p in paths]
    merged = {**runs[0], "command": [r["command"] for r in runs], "variants": {}, "skipped": {}}
    for r in runs:
        merged["variants"].update(r["variants"])
        merged["skipped"].update(r["skipped"])
    merged["summary"] = summary = summarize(merged)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "e2e.json").write_text(json.dumps(merged, indent=1, default=str))
    steps, w = merged["steps"], merged["workload"]
    extrapolated = steps != SCHEDULE
    v = merged["versions"]
    lines = [
        "# End to end: the speed a user gets",
        "",
        f"{merged['device']}, torch {v['torch']}, diffusers {v['diffusers']}, torchao {v['torchao']}, {merged['date']}.",
        f"Full-size CogVideoX-5B architecture, random bf16 weights, {w['frames']}x{w['height']}x{w['width']}; every variant in a fresh process,",
        "wall clock of the real `engine.invert` and `engine.edit(output=\"frames\")` calls. Made by",
        *[f"`{c}`" for c in merged["command"]],
        "and rendered by `python benchmarks/e2e.py report ...`.",
        "",
        f"Each cogedit call ran {steps} steps; " + (
            f"**the times below are EXTRAPOLATED to {SCHEDULE} steps** (measured wall clock + {SCHEDULE - steps} x the call's median step; "
            "the measured times are in the second table)." if extrapolated else f"the times below are measured at {SCHEDULE} steps."
        ),
    ]
    up = merged["variants"].get("upstream")
    if up and up.get("ok"):
        lines.append(
            f"Upstream (its own method, everything resident, CFG rows): **{summary['upstream_s']:.1f} s, EXTRAPOLATED** from {up['timed_steps']} timed steps "
            f"per loop (invert {up['per_step_s']['invert']:.2f} s/step, edit {up['per_step_s']['edit']:.2f} s/step, fixed phases {up['fixed_s']:.1f} s), "
            f"peak {up['peak_vram_bytes'] / 2**30:.1f} GiB."
        )
    lines += [
        "",
        "| variant | invert s | first edit (invert + edit) s | further edit s | first vs upstream | further vs upstream | peak VRAM GiB | recompile_limit hits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["rows"].items():
        label = f"{name} (per prompt, {r['prompts']} in one pass)" if r["prompts"] > 1 else name
        lines.append(
            f"| {label} | {_f(r['invert_s'])} | {_f(r['first_edit_s'])} | {_f(r['further_edit_s'])} | {_f(r['first_vs_upstream'], '{:.2f}x')} | "
            f"{_f(r['further_vs_upstream'], '{:.2f}x')} | {_f(r['peak_vram_gib'])} | {r['recompile_limit_hits']} |"
        )
    lines += ["", f"Measured ({steps} steps per call): wall clock, and the phases of each call.", "",
              "| variant | call | wall s | before step 1 (loads, compile, imports) s | steps s | median step s | decode s |", "|---|---|---|---|---|---|---|"]
    for name, row in merged["variants"].items():
        if name == "upstream" or not row.get("ok"):
            continue
        for call, c in row["calls"].items():
            decode = c["phases"].get("decode", {}).get("seconds")
            lines.append(f"| {name} | {call} | {c['wall_s']:.1f} | {_f(c.get('before_first_step_s'))} | {_f(c.get('steps_s'))} | {c['median_step_s']:.2f} | {_f(decode)} |")
    failed = {n: r["error"] for n, r in merged["variants"].items() if not r.get("ok")}
    for title, items in (("Failed", failed), ("Not run (time guard)", merged["skipped"])):
        if items:
            lines += ["", f"{title}:", *[f"- {n}: {why}" for n, why in items.items()]]
    (out_dir / "E2E.md").write_text("\n".join(lines) + "\n")
    names = list(summary["rows"])
    bar_chart(names, [summary["rows"][n]["first_edit_s"] for n in names], f"first edit s ({SCHEDULE} steps{', extrapolated' if extrapolated else ''})",
              f"cogedit end to end, {merged['device']}", out_dir / "e2e.png", [summary["rows"][n]["prompts"] == 1 for n in names])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="measure (on the GPU): JSON and logs under --out's folder")
    r.add_argument("--out", required=True)
    r.add_argument("--variants", default="upstream,cold,warm,nocompile,fp8,4prompts")
    r.add_argument("--budget", type=float, default=560.0, help="seconds: a variant that cannot finish within them is skipped")
    r.add_argument("--estimate-scale", type=float, default=1.0, help="scales the time guard's estimates (0 starts everything)")
    r.add_argument("--gpu", type=int, default=None, help="GPU to run on (else CUDA_VISIBLE_DEVICES as set)")
    r.add_argument("--workdir", default="/tmp/cogedit-e2e", help="random weights (shared) and cache folders")
    for p in (r, c := sub.add_parser("child")):
        p.add_argument("--steps", type=int, default=SCHEDULE)
        p.add_argument("--upstream-steps", type=int, default=3)
        p.add_argument("--tiny", action="store_true", help="the tiny model at tiny sizes: checks the harness on a CPU")
    c.add_argument("--variant", required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--cache", required=True)
    c.add_argument("--result", required=True)
    rep = sub.add_parser("report", help="render JSON(s) into E2E.md, e2e.json, e2e.png")
    rep.add_argument("json", nargs="+", type=Path)
    rep.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    if args.command == "report":
        report(args.json, args.out_dir)
    elif args.command == "child":
        row = upstream_child(args) if args.variant == "upstream" else child(args)
        Path(args.result).write_text(json.dumps(row, default=str))
    else:
        if args.gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)  # inherited by every variant's process
        run(args)


if __name__ == "__main__":
    main()
