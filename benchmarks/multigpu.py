"""Beyond one GPU, measured (issue 20): a batch over two GPUs, and one edit split over two.

    python benchmarks/multigpu.py --out DIR [--steps 4] [--time-limit 540]   # measure (2 GPUs)
    python benchmarks/multigpu.py --out DIR --tiny                           # the script, on a CPU
    python benchmarks/multigpu.py --report DIR/multigpu.json                 # -> benchmarks/results/

Full-size CogVideoX-5B with random weights (engine.models.tiny.write_random_5b), 49x480x720,
eager (no --compile: each worker would pay its own warm-up), wall clock of the engine's own calls:

- batch: 2 videos x 4 prompts (one pass of 4 each), `engine.batch` in this process (one GPU)
  against `engine.batch(nproc=2)` (two workers started through torchrun, their start included);
- first edit: invert + one edit, `engine.run` against `engine.run(gpus=2)` (the guidance halves
  on two GPUs; the latents of the two are compared).

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
RUNS = ("first_edit_1gpu", "first_edit_2gpu", "batch_1gpu", "batch_2gpu")
# Expected cost of a run against the one before it, for the time guard (the 2-GPU runs ~0.6x).
GUESS = {"first_edit_2gpu": 1.0, "batch_1gpu": 4.0, "batch_2gpu": 0.7}
STEP_PHASES = ("invert", "edit")


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
        result = engine.batch(jobs, model, out_dir=work / f"out-{name}", output="frames", nproc=2 if name.endswith("2gpu") else 1, **common)
        row["rows"] = [r.__dict__ for r in result.rows]
        row["failed"] = len(result.failed)
    else:
        _, result = engine.run(
            video, model, PROMPTS[:1], steps=args.steps, output="frames", gpus=2 if name.endswith("2gpu") else 1, **workload(args.tiny), **extra, **common
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
        if "first_edit_1gpu" in LATENTS and "first_edit_2gpu" in LATENTS:
            a, b = LATENTS["first_edit_1gpu"], LATENTS["first_edit_2gpu"]
            result["split_vs_one"] = {"rel_l2": float((a - b).norm() / a.norm()), "max_abs": float((a - b).abs().max())}
        result["total_s"] = time.perf_counter() - begin
        (out / "multigpu.json").write_text(json.dumps(result, indent=1, default=str))
    try:
        plot(result, out / "multigpu.png")
    except ImportError:
        print("no matplotlib here: the report step draws multigpu.png", flush=True)
    print(f"wrote {out / 'multigpu.json'} in {result['total_s']:.0f} s", flush=True)


def _ratio(runs: dict, one: str, two: str, key: str) -> str:
    if key not in runs.get(one, {}) or key not in runs.get(two, {}):
        return "not measured"
    return f"{runs[one][key] / runs[two][key]:.2f}x"


def report(path: Path, notes: dict[str, str]) -> None:
    """`notes`: run -> what happened to it since (a run that failed on a bug fixed later)."""
    result = json.loads(path.read_text())
    dest = ROOT / "benchmarks/results"
    shutil.copyfile(path, dest / "multigpu.json")
    runs = result["runs"]
    w = result["workload"]
    model = "The tiny test model (a check of the script)" if result["device"] == "cpu" else "CogVideoX-5B architecture with random weights"
    lines = [
        "# Beyond one GPU (issue 20)",
        "",
        f"Device: {result['device']}; torch {result['torch']}; {result['date']}. Command: `{result['command']}`.",
        f"{model}, {w['frames']}x{w['height']}x{w['width']}, eager, {result['steps']} steps measured "
        f"(the device budget allowed no more); NVLink multicast off ({', '.join(f'{k}={v}' for k, v in result['env'].items())}).",
        "Wall clock of the engine's calls from an empty cache; the 2-GPU runs include starting their two workers (torchrun's launcher).",
        "\"50 steps\" is projected from the same runs: wall - measured step time + 50/steps x step time (each phase's median step).",
        "",
        "| run | wall s | steps s | projected 50 steps s | note |",
        "|---|---|---|---|---|",
    ]
    for name in RUNS:
        r = runs.get(name, {})
        if "wall_s" in r:
            note = f"{r['failed']} failed rows" if r.get("failed") else ""
            lines.append(f"| {name} | {r['wall_s']:.1f} | {r['step_s']:.1f} | {r['projected_50_s']:.1f} | {note} |")
        elif name in notes:
            said = f" (it said: `{r['error']}`)" if "error" in r else ""
            lines.append(f"| {name} | - | - | - | {notes[name]}{said} |")
        else:
            lines.append(f"| {name} | - | - | - | {r.get('skipped') or r.get('error', 'not run')} |")
    lines += [
        "",
        "| speed-up (one GPU / two) | measured | projected at 50 steps | issue's target |",
        "|---|---|---|---|",
        f"| batch, 2 videos x {w['prompts']} prompts | {_ratio(runs, 'batch_1gpu', 'batch_2gpu', 'wall_s')} | {_ratio(runs, 'batch_1gpu', 'batch_2gpu', 'projected_50_s')} | >= 1.8x |",
        f"| first edit (invert + edit), --gpus 2 | {_ratio(runs, 'first_edit_1gpu', 'first_edit_2gpu', 'wall_s')} | {_ratio(runs, 'first_edit_1gpu', 'first_edit_2gpu', 'projected_50_s')} | >= 1.5x |",
    ]
    if "wall_s" in runs.get("batch_1gpu", {}) and "wall_s" in runs.get("batch_2gpu", {}):
        one, two = runs["batch_1gpu"], runs["batch_2gpu"]
        lines += [
            "",
            f"Batch: measured at {result['steps']} steps, {one['wall_s']:.1f} s on one GPU and {two['wall_s']:.1f} s on two "
            f"({_ratio(runs, 'batch_1gpu', 'batch_2gpu', 'wall_s')}); projected (derived, not measured) to 50 steps from those runs, "
            f"{one['projected_50_s']:.0f} s and {two['projected_50_s']:.0f} s ({_ratio(runs, 'batch_1gpu', 'batch_2gpu', 'projected_50_s')}): "
            "the fixed costs (loads, encode, decode, the workers' start) weigh less against 50 steps. The two-GPU projection "
            "counts worker 0's steps; each worker's share is one video's inversion and its 4 edits (multigpu.json's rows name each row's worker).",
        ]
    if "split_vs_one" in result:
        s = result["split_vs_one"]
        lines += ["", f"--gpus 2 against one GPU, edited latents: rel. L2 {s['rel_l2']:.2e}, max abs {s['max_abs']:.2e} ({'fp32' if result['device'] == 'cpu' else 'bf16'})."]
    lines += ["", "Phases of each run (worker 0's for the 2-GPU runs):", ""]
    for name in RUNS:
        for p in runs.get(name, {}).get("phases", []):
            step = f", median step {median_step(p):.2f} s" if p["name"] in STEP_PHASES and p["step_seconds"] else ""
            lines.append(f"- {name} / {p['name']}: {p['seconds']:.1f} s{step} — {p['detail']}")
    (dest / "MULTIGPU.md").write_text("\n".join(lines) + "\n")
    png = path.with_name("multigpu.png")
    if png.exists():  # drawn where it was measured: matplotlib is there
        shutil.copyfile(png, dest / "multigpu.png")
    else:
        try:
            plot(result, dest / "multigpu.png")
        except ImportError:
            print("no multigpu.png beside the JSON and no matplotlib here: the report has no plot", flush=True)
    print(f"wrote {dest / 'MULTIGPU.md'}")


def plot(result: dict, path: Path) -> None:
    from benchmarks.plots import bar_chart

    runs = result["runs"]
    shown = [n for n in RUNS if "wall_s" in runs.get(n, {})]
    bar_chart(shown, [runs[n]["wall_s"] for n in shown], f"wall clock (s), {result['steps']} steps", f"one GPU vs two, {result['device']}", path, [n.endswith("2gpu") for n in shown])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for multigpu.json")
    ap.add_argument("--report", type=Path, help="render a multigpu.json into benchmarks/results/MULTIGPU.md, .json and .png")
    ap.add_argument("--note", action="append", default=[], metavar="RUN=TEXT", help="with --report: what the table says for a run that has no figures (repeatable)")
    ap.add_argument("--steps", type=int, default=3, help="denoising steps of every run (the first of a phase carries its load: 3 leave 2 clean ones)")
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
