"""Turn the benchmark JSON files into benchmarks/results/RESULTS.md and PNG plots.

    python benchmarks/report.py benchmarks/results/run_*.json

For each variant the newest run in which it ran is used; ratios against the staged plan use
the staged plan measured in that same run. Whole-workflow times at 50 steps are derived from
the measured parts: fixed costs (loads, encode, embed, decode) + 50 x the median step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GiB = 1 << 30
STEPS = 50
ORDER = [
    "upstream", "model_offload", "sequential", "staged", "staged-compiled", "staged-fp8-compiled",
    "staged-4prompts", "staged-4prompts-compiled", "staged-4prompts-fp8-compiled", "lean", "int8", "nf4", "offload", "disk",
]
LABEL = {
    "upstream": "upstream, as published (all resident)",
    "model_offload": "upstream + model offload + VAE tiling",
    "sequential": "upstream + sequential offload",
    "staged": "cogedit staged (default)",
    "staged-compiled": "cogedit staged --compile (regional torch.compile)",
    "staged-4prompts": "cogedit staged, 4 prompts in one pass",
    "staged-4prompts-compiled": "cogedit staged --compile, 4 prompts in one pass",
    "staged-fp8-compiled": "cogedit staged --compile --fp8",
    "staged-4prompts-fp8-compiled": "cogedit staged --compile --fp8, 4 prompts in one pass",
    "lean": "cogedit lean (each block a row at a time)",
    "int8": "cogedit int8",
    "nf4": "cogedit nf4",
    "offload": "cogedit offload (group offload, streams)",
    "disk": "cogedit staged, disk-tier stored attention (fp8)",
}


def load(paths: list[str]) -> tuple[dict, dict]:
    runs = {Path(p).stem: json.loads(Path(p).read_text()) for p in sorted(paths)}
    chosen = {}
    for run_id, run in runs.items():
        for name, row in run["variants"].items():
            if row.get("ok") or "uncapped" in row or name not in chosen:
                chosen[name] = (run_id, row)
    return runs, chosen


def phases_of(row: dict) -> dict:
    return row.get("phases") or row.get("uncapped", {}).get("phases", {})


def median(ph: dict | None) -> float | None:
    if not ph or not ph.get("step_times"):
        return None
    t = sorted(ph["step_times"])
    return t[len(t) // 2] if len(t) % 2 else (t[len(t) // 2 - 1] + t[len(t) // 2]) / 2


def workflow(name: str, row: dict, steps_timed: int) -> dict:
    """First edit (invert + edit) and each further edit at 50 steps, from measured parts."""
    ph = phases_of(row)
    if not ph:
        return {}
    inv, edit = median(ph.get("invert")), median(ph.get("edit"))
    if inv is None or edit is None:
        return {}

    def fixed(key: str, med: float) -> float:
        return max(ph[key]["seconds"] - steps_timed * med, 0.0)

    if name in ("upstream", "model_offload", "sequential"):
        base = sum(ph[k]["seconds"] for k in ("load", "encode", "embed", "decode") if k in ph)
        first = base + fixed("invert", inv) + fixed("edit", edit) + STEPS * (inv + edit)
        return {"first": first, "further": first, "invert_step": inv, "edit_step": edit}  # it re-inverts every time
    pre = sum(ph[k]["seconds"] for k in ("video", "encode", "embed", "embed+", "decode") if k in ph)
    first = pre + fixed("invert", inv) + fixed("edit", edit) + STEPS * (inv + edit)
    # A further edit is what the second, cache-served edit cost (its own fixed part: no compile).
    again = "edit+" if ph.get("edit+", {}).get("step_times") else "edit"
    further = ph.get("embed++", {}).get("seconds", 0) + fixed(again, median(ph[again])) + STEPS * median(ph[again]) + ph.get("decode", {}).get("seconds", 0)
    return {"first": first, "further": further, "invert_step": inv, "edit_step": edit}


def peak(row: dict) -> tuple[float, float]:
    ph = phases_of(row)
    return max((p["peak_alloc"] for p in ph.values()), default=0) / GiB, max((p["peak_reserved"] for p in ph.values()), default=0) / GiB


def machine_scale(runs: dict, run_id: str, up_run: str | None, key: str) -> float:
    """Times of run `run_id` in the upstream run's terms: the staged plan measured in both gives
    the ratio (the machines lent differ by a few percent from lease to lease)."""
    if not up_run or run_id == up_run:
        return 1.0
    steps = lambda r: runs[r]["steps_timed"]  # noqa: E731
    here = workflow("staged", runs[run_id]["variants"].get("staged", {}), steps(run_id))
    there = workflow("staged", runs[up_run]["variants"].get("staged", {}), steps(up_run))
    return there[key] / here[key] if here and there else 1.0


def split_steps(ph: dict) -> tuple[list[float], list[float]]:
    """A phase's step times, split into injected and reference-free steps."""
    times, kinds = ph.get("step_times", []), ph.get("step_injected") or [True] * len(ph.get("step_times", []))
    return [t for t, k in zip(times, kinds) if k], [t for t, k in zip(times, kinds) if not k]


def disk_section(run_id: str, row: dict) -> list[str]:
    ph = phases_of(row)
    cold, cold_plain = split_steps(ph.get("edit", {}))
    hot, _ = split_steps(ph.get("edit+", {}))
    if not cold or "disk_read_bytes_per_s" not in row:
        return []
    rate = row["disk_read_bytes_per_s"] / 1e9
    per_step = row["store_bytes"] / max(len(cold), 1) / 1e9
    cap = ph["invert"]["step_times"]
    return [
        "",
        "## Disk-tier stored attention",
        "",
        f"{run_id}: every block of {len(cold)} consecutive edit steps stored in fp8 ({per_step:.2f} GB per step, one file per block),",
        "evicted from the page cache before the first edit (posix_fadvise), so it read from the disk; a plain sequential read",
        f"of the same files ran at {rate:.2f} GB/s. Replayed steps from the disk: {', '.join(f'{t:.2f}' for t in cold)} s;",
        f"the same steps in the second edit (files in the page cache): {', '.join(f'{t:.2f}' for t in hot)} s",
        f"({median({'step_times': cold}) / median({'step_times': hot}):.2f}x); a step with no injection: {', '.join(f'{t:.2f}' for t in cold_plain) or '-'} s.",
        f"Inversion steps while capturing: {', '.join(f'{t:.2f}' for t in cap)} s.",
    ]


def window_section(summary: dict, chosen: dict, runs: dict) -> list[str]:
    """Per-edit time at 50 steps by injection window, from measured injected and 1-row steps."""
    up = summary.get("upstream", {}).get("further")
    up_run = summary.get("upstream", {}).get("run")
    lines = []
    for name in [n for n in ORDER if n.startswith("staged")]:
        rows, prompts = (8, 4) if "4prompts" in name else (2, 1)
        s = summary.get(name)
        if not s or "further" not in s:
            continue
        # A reference-free step runs `rows` rows like the inversion's one: rows x the 1-row step.
        inj, plain = s["edit_step"], rows * s["invert_step"]
        fixed = s["further"] - STEPS * inj
        cells = []
        for end in (1.0, 0.8, 0.6, 0.5, 0.4, 0.3):
            per_edit = (fixed + STEPS * (end * inj + (1 - end) * plain)) / prompts
            scale = machine_scale(runs, s["run"], up_run, "further")
            cells.append(f"{per_edit:.0f} s" + (f" ({per_edit * scale / up:.2f}x)" if up else ""))
        lines.append(f"| {LABEL[name]} | {inj:.2f} | {plain:.2f} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    return [
        "",
        "## Further edits by injection window (derived)",
        "",
        "Each further edit at 50 steps when only the first part of the steps injects (`--inject-steps 0:END`):",
        "injected steps at the measured edit step, the others at rows x the measured 1-row inversion step",
        "(the same forward per row). Per edit, and against the upstream method's full-window edit.",
        "",
        "| variant | injected step s | plain step s | 0:1 | 0:0.8 | 0:0.6 | 0:0.5 | 0:0.4 | 0:0.3 |",
        "|---|---|---|---|---|---|---|---|---|",
        *lines,
    ]


def numerics_section(runs: dict) -> list[str]:
    lines = []
    for run_id, run in runs.items():
        for name, diff in run.get("latent_differences", {}).items():
            cells = [f"{k}: rel. L2 {v['rel_l2']:.2e}, max abs {v['max_abs']:.2e}" for k, v in diff.items()]
            lines.append(f"| {LABEL.get(name, name)} | {run_id} | {'; '.join(cells)} |")
    if not lines:
        return []
    return [
        "",
        "## Numerics against the staged plan on the full-size model",
        "",
        "Same clip, same random weights, same settings: the inverted noise and the edited latents of each variant",
        "against the staged plan's in the same run (bf16 on the GPU).",
        "",
        "| variant | run | difference from staged |",
        "|---|---|---|",
        *lines,
    ]


def main(paths: list[str]) -> None:
    runs, chosen = load(paths)
    out = Path(__file__).with_name("results")
    any_run = next(iter(runs.values()))
    peaks = [r["peak_tflops_bf16"] for r in runs.values() if r.get("peak_tflops_bf16")]
    lines = [
        "# Benchmark results",
        "",
        f"Device: {any_run['device']}; torch {any_run['torch']}; measured {min(r['date'] for r in runs.values())} to {max(r['date'] for r in runs.values())}.",
        "CogVideoX-5B architecture with random weights (memory and time are the real model's), 49 frames at 480x720",
        f"({any_run['flops']['tokens']} tokens), {any_run['steps_timed']} steps timed per phase, median step reported.",
        f"Measured bf16 matmul peak: {min(peaks):.0f} to {max(peaks):.0f} TFLOP/s across runs. Commands: `{'`, `'.join(sorted({r['command'] for r in runs.values()}))}`",
        "(each in `python3 benchmarks/bench.py ...` on the device; the runs are the JSON files beside this one).",
        "Each cogedit plan ran under an allocator cap 0.5 GiB below its card (torch.cuda.set_per_process_memory_fraction).",
        "",
        "## Per plan",
        "",
        "| variant | run | card | fits | peak alloc GiB | peak reserved GiB | predicted GiB | invert s/step | edit s/step | edit rows | vs staged (same run) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    flops = any_run["flops"]
    summary = {}
    for name in [n for n in ORDER if n in chosen]:
        run_id, row = chosen[name]
        staged = runs[run_id]["variants"].get("staged", {})
        wf = workflow(name, row, runs[run_id]["steps_timed"])
        ref = workflow("staged", staged, runs[run_id]["steps_timed"]) if staged.get("ok") else {}
        a, r = peak(row)
        pred = max(row.get("predicted", row.get("uncapped", {}).get("predicted", {0: 0})).values()) / GiB
        ok = "yes" if row.get("ok") else (f"no (needs {a:.1f} GiB)" if "uncapped" in row else "no")
        card = f"{row.get('cap_gb')} GB" if row.get("cap_gb") else "-"
        rows = {"upstream": "2+2 ref", "model_offload": "2+2 ref", "sequential": "2+2 ref", "lean": "2+1 ref, 1 per block call", "disk": "2"}.get(name, "8+1 ref" if "4prompts" in name else "2+1 ref")
        vs = ""
        if ref and wf and name != "staged":
            vs = f"invert {wf['invert_step'] / ref['invert_step']:.2f}x, edit {wf['edit_step'] / ref['edit_step']:.2f}x"
        f = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
        lines.append(f"| {LABEL[name]} | {run_id} | {card} | {ok} | {a:.2f} | {r:.2f} | {f(pred) if pred else '-'} | {f(wf.get('invert_step'))} | {f(wf.get('edit_step'))} | {rows} | {vs} |")
        summary[name] = {"run": run_id, "peak_alloc_gib": a, "peak_reserved_gib": r, "predicted_gib": pred, **wf}
    up = summary.get("upstream", {})
    lines += ["", "## Whole workflow at 50 steps (derived)", "", "| variant | first edit (s) | each further edit (s) | per edit, x upstream |", "|---|---|---|---|"]
    lines.insert(len(lines) - 2, "Ratios compare with the upstream method measured in the same run, or, for a variant from another run, through the staged plan measured in both runs.\n")
    for name, s in summary.items():
        if "first" not in s or name == "disk":  # disk injects at one step only: see below
            continue
        four = "4prompts" in name
        per_edit = s["further"] / (4 if four else 1)
        first = s["first"] if not four else None
        first_scale, further_scale = (machine_scale(runs, s["run"], up.get("run"), k) for k in ("first", "further"))
        ratio = (f"first {s['first'] * first_scale / up['first']:.2f}x, " if first else "") + f"further {per_edit * further_scale / up['further']:.2f}x" if up else ""
        lines.append(f"| {LABEL[name]} | {first and f'{first:.0f}' or '-'} | {s['further']:.0f}{' for 4 prompts' if four else ''} | {ratio} |")
    if "disk" in chosen:
        lines += disk_section(*chosen["disk"])
    lines += window_section(summary, chosen, runs)
    lines += numerics_section(runs)
    if "staged" in summary:
        # Each run measured its own matmul peak; a step's fraction uses its own run's.
        peak_of = lambda name: runs[summary[name]["run"]].get("peak_tflops_bf16") or 0  # noqa: E731
        edit_flops = {"upstream": 2 * flops["edit_row_doubled_keys"] + 2 * flops["row"]}
        invert_rows = {"upstream": 2}
        lines += [
            "",
            "## Fraction of the measured bf16 peak",
            "",
            f"One row through the transformer is {flops['row']:.3g} FLOP; an edit row attending to doubled keys {flops['edit_row_doubled_keys']:.3g}.",
            "Edit steps: 2 edit rows + 1 reference row (upstream: 2 edit rows + 2 reference rows). Each against its run's measured peak.",
            "",
            "| variant | run | peak TFLOP/s | inversion step | edit step |",
            "|---|---|---|---|---|",
        ]
        for name in ("upstream", "staged", "staged-compiled", "staged-fp8-compiled"):
            if (c := summary.get(name)) and (pk := peak_of(name)):
                inv = invert_rows.get(name, 1) * flops["row"] / c["invert_step"] / 1e12 / pk
                edit = edit_flops.get(name, 2 * flops["edit_row_doubled_keys"] + flops["row"]) / c["edit_step"] / 1e12 / pk
                lines.append(f"| {LABEL[name]} | {c['run']} | {pk:.0f} | {inv:.0%} | {edit:.0%} |")
        if "staged-fp8-compiled" in summary:
            lines.append("\n--fp8 counts its FLOPs as bf16 ones: the fraction is what the same work would need at the bf16 peak.")
    lines += [
        "",
        "## Notes",
        "",
        "- Other command: `benchmarks/peak.py --out peak_lean_inplace.json` (defaults: 3 rows, groups of 1, MLP slices of 2048).",
        "- End-to-end speed (fresh processes, real engine calls, 50 steps) is in E2E.md (`benchmarks/e2e.py`), the one source",
        "  of cogedit's speed claims; the per-step times here serve the plans' comparison within each run.",
        "- Phase peaks from run_h on: each phase collects garbage first. Before, a transformer left in a",
        "  reference cycle by diffusers' hooks counted in the next phase's peak (the '1.4 GiB left after lean",
        "  and --compile' of earlier runs, and decode peaks of 10.4 GiB): it was not a leak, the next load",
        "  collected it. The peak reserved column still shows it, since the allocator keeps the freed pages.",
        "- lean (run_k): 11.32 GiB allocated, 11.40 GiB reserved: it passes the 11.5 GiB cap of a 12 GB card",
        "  less its CUDA context. In run_j (11.57 / 11.81) it failed that cap by 48 MiB; since then each row",
        "  group's block adds its residuals into its input in place and the reference row's queries run a few",
        "  heads at a time (`benchmarks/peak.py`: 11.29 GiB at one forward's peak, peak_lean_inplace.json,",
        "  against 11.55 in peak_lean.json). Earlier lean runs (run_b..run_e) replayed stored attention.",
        "- Disk tier (run_k): the first replayed step's files are now read while the transformer loads. The",
        "  first replayed step still took 6.72 s (6.99 s in run_h): this disk reads 1.20 GB/s and two replayed",
        "  steps need 9.2 GB, so the reads, not the scheduling, set the pace. From the page cache the same steps",
        "  take 2.81 s, so replay costs nothing over memory once the disk keeps up (>= 1.7 GB/s at this step time).",
        "- --fp8 (torchao float8, e4m3 weights with per-row scales, per-token activation scales): with",
        "  --compile, 0.64 s / 2.72 s per invert / edit step against 0.89 / 3.58 staged and 0.71 / 2.94",
        "  --compile alone (run_m). Without --compile it was slower than bf16 per forward (the removed",
        "  benchmarks/speed.py): the activation scaling runs as separate kernels. Accuracy: one",
        "  inversion forward's output moves 8.3e-2 (rel. L2) from eager bf16, against 1.9e-2 for --compile",
        "  alone; the 4-step noise 8.9e-2 against 1.8e-2. torchao's recommended inductor settings",
        "  (coordinate-descent autotuning) made the first compile take over 5 minutes; cogedit turns them off.",
        "- CUDA graphs (tried with the removed benchmarks/speed.py: regional compile with",
        "  mode=reduce-overhead) fail: the 42 blocks replay one graph, and each replay overwrites the output",
        "  the next block reads (torch's cudagraph trees refuse it). Not pursued: a 0.9 s forward launches",
        "  on the order of a thousand kernels, a few milliseconds of launch time, so graphs could win ~1%.",
        "- Numerics: on this random-weight model with guidance 6, a rounding-level change is amplified over",
        "  the 4 steps to about 25% of the edited latent (lean in run_j differs from staged only in how the",
        "  final norms' small linear runs, one row vs three, and shows 0.25; --compile shows 0.26). The",
        "  full-size difference therefore cannot separate an option from bf16 rounding; the CPU tests",
        "  (tiny model; fp8 against bf16's own error) bound each option's arithmetic instead. run_i's staged-flash yardstick",
        "  failed: flash attention has no kernel for the VAE's 512-wide attention head.",
        "- int8's prediction now adds bitsandbytes' int8 activation buffers, 2.1 GiB as measured in run_d",
        "  (9.6 GiB against 7.5 predicted before); this table's int8 row predates that.",
        "- sequential offload was timed over one step of each kind, and re-inverts for every edit as the upstream",
        "  method does (no decode phase was timed for it, so its edit times are a floor). Against it, cogedit's",
        "  offload plan is 4.3x faster per inversion step, 1.86x per edit step (its 4-row step is compute-bound,",
        "  so streaming the weights hides behind it), 2.1x per first edit and 2.9x per further edit.",
        "- --compile: the first invert and edit phases include about 21 s and 16 s of compilation (run_m), counted",
        "  in the derived first-edit time. The further edit is the benchmark's second edit, in the same",
        "  process, which compiles nothing; a further edit in a new process compiles again (from inductor's",
        "  on-disk cache, not measured here).",
        "- The lease machines differ by up to 15% between runs (staged edit step 3.58 s in run_m, 4.16 s",
        "  in run_h); ratios are taken within a run. The upstream method was measured again in run_m, beside",
        "  staged, --compile and --compile --fp8, so their ratios need no chaining.",
    ]
    lines += ["", "Plots: `peaks.png` (peak memory per plan against its card), `steps.png` (time per step), `phases.png` (peak memory phase by phase).", ""]
    (out / "RESULTS.md").write_text("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, chosen, out)
    print("\n".join(lines))


def plot(summary: dict, chosen: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ORDER if n in summary]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = ["#b55" if n in ("upstream", "model_offload", "sequential") else "#4a7" for n in names]
    ax.bar(range(len(names)), [summary[n]["peak_alloc_gib"] for n in names], color=colors, label="measured peak (allocated)")
    ax.scatter(range(len(names)), [summary[n]["predicted_gib"] or float("nan") for n in names], color="k", marker="_", s=400, label="predicted (engine.models.plans)", zorder=3)
    for gb in (24, 16, 12, 8):
        ax.axhline(gb, color="#999", lw=0.8, ls="--")
        ax.text(len(names) - 0.5, gb + 0.3, f"{gb} GB card", fontsize=8, color="#666", ha="right")
    ax.set_xticks(range(len(names)), [n for n in names], rotation=30, ha="right")
    ax.set_ylabel("GiB")
    ax.set_title("Peak GPU memory, CogVideoX-5B at 49x480x720 (H100)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "peaks.png", dpi=110)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [summary[n].get("invert_step") or 0 for n in names], width=0.4, label="invert step")
    ax.bar([i + 0.2 for i in x], [summary[n].get("edit_step") or 0 for n in names], width=0.4, label="edit step")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("seconds per step (median)")
    ax.set_title("Time per denoising step (staged-4prompts: 4 prompts per step)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "steps.png", dpi=110)

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for n in ("upstream", "model_offload", "staged", "int8", "nf4", "offload"):
        if n not in chosen:
            continue
        ph = phases_of(chosen[n][1])
        keys = [k for k in ph if k in ("load", "encode", "embed", "invert", "edit", "decode")]
        ax.step(range(len(keys)), [ph[k]["peak_alloc"] / GiB for k in keys], where="mid", label=n, marker="o")
        ax.set_xticks(range(len(keys)), keys)
    ax.set_ylabel("peak allocated GiB in the phase")
    ax.set_title("GPU memory phase by phase")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "phases.png", dpi=110)


if __name__ == "__main__":
    main(sys.argv[1:] or [str(p) for p in sorted(Path(__file__).with_name("results").glob("run_*.json"))])
