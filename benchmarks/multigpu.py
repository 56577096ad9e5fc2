"""Beyond one GPU, measured: a batch over two GPUs, and one edit split over two or four.

    python benchmarks/multigpu.py --out DIR [--steps 50] [--runs a,b] [--time-limit 540]   # measure
    python benchmarks/multigpu.py --out DIR --tiny --steps 2                              # the script, on a CPU
    python benchmarks/multigpu.py --report DIR/multigpu.json [DIR2/multigpu.json ...]    # -> benchmarks/results/

Full-size CogVideoX-5B with random weights (engine.models.tiny.write_random_5b), 49x480x720,
eager (no --compile: each worker would pay its own warm-up), wall clock of the engine's own calls:

- batch: 2 videos x 4 prompts (one pass of 4 each), `engine.batch` in this process (one GPU)
  against `engine.batch(nproc=2)` (two workers started through torchrun, their start included);
- first edit: invert + one edit, `engine.run` against `engine.run(gpus=2)` and `gpus=4` (the
  inversion's tokens split 2 or 4 ways; the edit's guidance halves on two groups, each splitting
  its tokens 1 or 2 ways; the latents are compared with one GPU's).

Runs too long for one command go in several (`--runs`, the same `--workdir` so the model is built
once); `--report` merges their JSON files, later runs replacing earlier ones of the same name.

Each run starts from an empty cache. Edits are decoded but not written (`output="frames"`: the
device has no ffmpeg). Every phase's steps are timed (the reporter's per-step marks, after a CUDA
sync), so the report also projects each run to 50 steps: wall - measured step time + 50/steps x
it. A time guard skips what would not finish within --time-limit; the JSON is written after
every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.stages.distributed import MULTICAST_OFF  # noqa: E402

os.environ.update(MULTICAST_OFF)  # before torch starts NCCL anywhere, in this process and its workers

PROMPTS = ["a watercolor painting", "a charcoal sketch at night", "a snowy winter day", "a cyberpunk city in neon light"]
RUNS = ("first_edit_1gpu", "first_edit_2gpu", "first_edit_4gpu", "batch_1gpu", "batch_2gpu")
# Expected cost of a run against the one before it, for the time guard.
GUESS = {"first_edit_2gpu": 1.0, "first_edit_4gpu": 1.0, "batch_1gpu": 4.0, "batch_2gpu": 0.7}
FIRST_EDITS = [r for r in RUNS if r.startswith("first_edit")]
# The issue's targets: one GPU's wall clock over N GPUs', at 50 steps.
TARGETS = {"first_edit_2gpu": 1.6, "first_edit_4gpu": 2.8, "batch_2gpu": 1.8}
STEP_PHASES = ("invert", "edit")


def gpus_of(run: str) -> int:
    return int(run.rsplit("_", 1)[1].removesuffix("gpu"))


def run_options(tiny: bool) -> dict:
    """The first edits' inversion: CogVideoX-5B's 48 heads split 4 ways with or without guidance;
    the tiny model's 2 heads only 2 ways, so there its inversion has guidance (halves x 2 ways)."""
    return dict(source_prompt="a rabbit in a meadow", invert_guidance=3.0) if tiny else {}


def workload(tiny: bool) -> dict:
    if tiny:
        return dict(frames=9, height=96, width=160)
    return dict(frames=49, height=480, width=720)


def videos(tiny: bool) -> list[tuple[str, dict]]:
    """Two videos: on the GPU the 50-frame clip from its first and from its second frame (two inversions, same cost)."""
    if tiny:
        return [(str(ROOT / "tests/clips/bunny_wide.mp4"), {}), (str(ROOT / "tests/clips/bunny_small.mp4"), {})]
    clip = str(ROOT / "benchmarks/clip49.mp4")
    return [(clip, {}), (clip, {"skip_start": 1})]


def write_jobs(path: Path, tiny: bool, steps: int) -> Path:
    lines = []
    for n, (video, extra) in enumerate(videos(tiny)):
        opts = {**workload(tiny), "steps": steps, **extra}
        lines += ["[[job]]", f'name = "video{n}"', f"video = {json.dumps(video)}", f"prompts = {json.dumps(PROMPTS)}", "[job.invert]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in opts.items()]
        lines += ["[job.edit]", "batch = 4", ""]
    path.write_text("\n".join(lines))
    return path


def phases(records) -> list[dict]:
    out = []
    for r in records:
        steps = [b - a for a, b in zip([0.0] + r.advances, r.advances)]
        out.append({"name": r.name, "seconds": r.seconds, "peak_bytes": r.peak_bytes, "cache_hit": r.cache_hit, "detail": r.detail, "step_seconds": steps})
    return out


def median_step(p: dict) -> float:
    """A phase's median step, leaving out the first, which also carries the model's load."""
    steps = p["step_seconds"]
    return statistics.median(steps[1:] or steps)


def step_time(ph: list[dict]) -> float:
    """Seconds of the denoising steps in these phases: each phase's median step x its steps."""
    return sum(median_step(p) * len(p["step_seconds"]) for p in ph if p["name"] in STEP_PHASES and p["step_seconds"])


def run_one(name: str, args, model: Path, work: Path, jobs: Path) -> dict:
    import torch

    import engine

    cache = work / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    reporter = engine.Reporter(device="cuda" if torch.cuda.is_available() else "cpu")
    common = dict(cache_dir=cache, reporter=reporter, compile=False, device=None if torch.cuda.is_available() else "cpu")
    video, extra = videos(args.tiny)[0]
    start = time.perf_counter()
    row: dict = {}
    if name.startswith("batch"):
        result = engine.batch(jobs, model, out_dir=work / f"out-{name}", output="frames", nproc=gpus_of(name), **common)
        row["rows"] = [r.__dict__ for r in result.rows]
        row["failed"] = len(result.failed)
    else:
        _, result = engine.run(
            video, model, PROMPTS[:1], steps=args.steps, output="frames", gpus=gpus_of(name), **workload(args.tiny), **run_options(args.tiny), **extra, **common
        )
        LATENTS[name] = result.latents.float()
    row["wall_s"] = time.perf_counter() - start
    row["phases"] = phases(reporter.records)
    row["step_s"] = step_time(row["phases"])
    row["projected_50_s"] = row["wall_s"] - row["step_s"] + row["step_s"] * 50 / args.steps
    shutil.rmtree(cache, ignore_errors=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


LATENTS: dict = {}


def measure(args) -> None:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="multigpu-"))
    begin = time.perf_counter()
    gpus = torch.cuda.device_count()
    result: dict = {
        "device": f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(sys.argv),
        "steps": args.steps,
        "workload": {**workload(args.tiny), "videos": 2, "prompts": len(PROMPTS)},
        "env": {k: os.environ.get(k) for k in MULTICAST_OFF},
        "runs": {},
    }
    from benchmarks.bench import model_path

    model = model_path(work, args.tiny)
    result["build_s"] = time.perf_counter() - begin
    jobs = write_jobs(work / "jobs.toml", args.tiny, args.steps)
    last = result["build_s"]
    for name in [r for r in RUNS if r in args.runs.split(",")]:
        elapsed = time.perf_counter() - begin
        guess = last * GUESS.get(name, 1.0)
        if elapsed + guess > args.time_limit:
            result["runs"][name] = {"skipped": f"time guard: {elapsed:.0f} s gone, about {guess:.0f} s more expected, limit {args.time_limit} s"}
        else:
            print(f"== {name}", flush=True)
            try:
                row = run_one(name, args, model, work, jobs)
                last = row["wall_s"]
            except Exception as exc:  # a run that fails is a result too
                row = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            result["runs"][name] = row
            print(json.dumps({k: v for k, v in row.items() if k not in ("phases", "rows")}), flush=True)
        if "first_edit_1gpu" in LATENTS:
            a = LATENTS["first_edit_1gpu"]
            result["split_vs_one"] = {n: {"rel_l2": float((a - b).norm() / a.norm()), "max_abs": float((a - b).abs().max())} for n, b in LATENTS.items() if n != "first_edit_1gpu"}
        result["total_s"] = time.perf_counter() - begin
        (out / "multigpu.json").write_text(json.dumps(result, indent=1, default=str))
    try:
        plot(result, out / "multigpu.png")
    except ImportError:
        print("no matplotlib here: the report step draws multigpu.png", flush=True)
    print(f"wrote {out / 'multigpu.json'} in {result['total_s']:.0f} s", flush=True)


MARKER = "<!-- multigpu.py --report writes everything above this line; what follows is kept -->"


def _ratio(runs: dict, one: str, many: str, key: str) -> str:
    if key not in runs.get(one, {}) or key not in runs.get(many, {}):
        return "not measured"
    same = runs[one]["device"] == runs[many]["device"]
    return f"{runs[one][key] / runs[many][key]:.2f}x" + ("" if same else " (different machines)")


def merged(paths: list[Path]) -> tuple[list[dict], dict]:
    """Every file's header, and the runs of all of them (a later file's run replaces an earlier one)."""
    heads, runs = [], {}
    for path in paths:
        result = json.loads(path.read_text())
        heads.append(result)
        for name, row in result["runs"].items():
            if "wall_s" in row or name not in runs:
                runs[name] = {**row, "device": result["device"], "steps": result["steps"]}
    return heads, runs


def _run_lines(runs: dict, notes: dict[str, str]) -> list[str]:
    lines = ["| run | GPUs | machine | steps | wall s | steps s | projected 50 steps s | note |", "|---|---|---|---|---|---|---|---|"]
    for name in RUNS:
        r = runs.get(name, {})
        where = f"{gpus_of(name)} | {r.get('device', '-')} | {r.get('steps', '-')}"
        if "wall_s" in r:
            note = f"{r['failed']} failed rows" if r.get("failed") else ""
            lines.append(f"| {name} | {where} | {r['wall_s']:.1f} | {r['step_s']:.1f} | {r['projected_50_s']:.1f} | {note} |")
        else:
            said = notes.get(name, "") + (f" (it said: `{r['error']}`)" if "error" in r else "")
            lines.append(f"| {name} | {where} | - | - | - | {said or r.get('skipped', 'not run')} |")
    return lines


def report(paths: list[Path], notes: dict[str, str]) -> None:
    """Render the JSON files into MULTIGPU.md (above `MARKER`; the rest is kept) and copy the
    last one beside it. `notes`: run -> what the table says for a run without figures."""
    heads, runs = merged(paths)
    dest = ROOT / "benchmarks/results"
    shutil.copyfile(paths[-1], dest / "multigpu.json")
    w = heads[-1]["workload"]
    tiny = all(h["device"] == "cpu" for h in heads)
    lines = ["# Beyond one GPU", ""]
    lines += [f"- {h['device']}; torch {h['torch']}; {h['date']}; {h['steps']} steps: `{h['command']}`" for h in heads]
    lines += [
        "",
        f"{'The tiny test model on the CPU (a check of the script, not a measurement of speed)' if tiny else 'CogVideoX-5B architecture with random weights'}, "
        f"{w['frames']}x{w['height']}x{w['width']}, eager, NVLink multicast off ({', '.join(f'{k}={v}' for k, v in heads[-1]['env'].items())}). "
        "Wall clock of the engine's calls from an empty cache; the runs over several GPUs include starting their workers (torchrun's launcher). "
        '"Projected 50 steps" is wall - measured step time + 50/steps x step time (each phase\'s median step): the wall clock itself when run at 50 steps.',
        "",
        *_run_lines(runs, notes),
        "",
        "| speed-up (one GPU / N) | measured | projected at 50 steps | target |",
        "|---|---|---|---|",
    ]
    compared = {f"first_edit_{n}gpu": f"first edit (invert + edit), --gpus {n}" for n in (2, 4)}
    compared["batch_2gpu"] = f"batch, 2 videos x {w['prompts']} prompts, 2 workers"
    for many, what in compared.items():
        one = "batch_1gpu" if many.startswith("batch") else "first_edit_1gpu"
        lines.append(f"| {what} | {_ratio(runs, one, many, 'wall_s')} | {_ratio(runs, one, many, 'projected_50_s')} | >= {TARGETS[many]}x |")
    for h in heads:
        for name, s in (h.get("split_vs_one") or {}).items():
            lines += ["", f"{name} against one GPU ({h['device']}), edited latents: rel. L2 {s['rel_l2']:.2e}, max abs {s['max_abs']:.2e} ({'fp32' if h['device'] == 'cpu' else 'bf16'})."]
    lines += ["", "Phases of each run (worker 0's for the runs over several GPUs):", ""]
    for name in RUNS:
        for ph in runs.get(name, {}).get("phases", []):
            step = f", median step {median_step(ph):.2f} s" if ph["name"] in STEP_PHASES and ph["step_seconds"] else ""
            lines.append(f"- {name} / {ph['name']}: {ph['seconds']:.1f} s{step} — {ph['detail']}")
    md = dest / "MULTIGPU.md"
    kept = md.read_text().split(MARKER, 1)[1] if md.exists() and MARKER in md.read_text() else "\n"
    md.write_text("\n".join(lines) + "\n\n" + MARKER + kept)
    print(f"wrote {md}")


def plot(result: dict, path: Path) -> None:
    from benchmarks.plots import bar_chart

    runs = result["runs"]
    shown = [n for n in RUNS if "wall_s" in runs.get(n, {})]
    bar_chart(shown, [runs[n]["wall_s"] for n in shown], f"wall clock (s), {result['steps']} steps", f"one GPU vs several, {result['device']}", path, [gpus_of(n) > 1 for n in shown])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for multigpu.json")
    ap.add_argument("--report", type=Path, nargs="+", help="render multigpu.json files (merged, later runs first) into benchmarks/results/MULTIGPU.md and .json")
    ap.add_argument("--note", action="append", default=[], metavar="RUN=TEXT", help="with --report: what the table says for a run that has no figures (repeatable)")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps of every run (the first of a phase carries its load)")
    ap.add_argument("--runs", default=",".join(RUNS), help="which runs, comma-separated")
    ap.add_argument("--time-limit", type=float, default=540, help="seconds; runs that would end later are skipped")
    ap.add_argument("--tiny", action="store_true", help="the tiny model on the CPU: checks the script")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    if args.report:
        report(args.report, dict(n.split("=", 1) for n in args.note))
    else:
        measure(args)


if __name__ == "__main__":
    main()
