"""The GPU benchmark harness, run on the tiny model on the CPU: it must work before it costs GPU time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_harness_runs_plans_and_compares_numerics(tmp_path):
    out = tmp_path / "tiny.json"
    subprocess.run(
        [sys.executable, "benchmarks/bench.py", "--tiny", "--out", str(out), "--workdir", str(tmp_path), "--variants", "staged,lean,disk", "--steps", "4"],
        cwd=ROOT, check=True, capture_output=True, timeout=600,
    )
    results = json.loads(out.read_text())
    for name in ("staged", "lean", "disk"):
        row = results["variants"][name]
        assert row["ok"], row.get("error")
        assert len(row["phases"]["edit"]["step_times"]) == 3
    # The disk variant replays the middle steps only; the others inject at every step.
    assert results["variants"]["disk"]["phases"]["edit"]["step_injected"] == [True, True, False]
    assert results["variants"]["staged"]["phases"]["edit"]["step_injected"] == [True, True, True]
    diff = results["latent_differences"]
    assert diff["lean"]["edit"]["rel_l2"] < 1e-5, "row groups change nothing but rounding"
    assert diff["disk"]["noise"]["rel_l2"] == 0.0, "capturing attention leaves the trajectory alone"
    assert "edit" not in diff["disk"], "another window: not comparable"


def test_e2e_runs_every_variant_in_its_own_process_and_reports(tmp_path):
    """benchmarks/e2e.py on the tiny model: fresh processes, warm after cold in the same cache
    folders, the time guard, the upstream extrapolation, and the report."""
    out = tmp_path / "out" / "e2e.json"
    cmd = [sys.executable, "benchmarks/e2e.py", "run", "--tiny", "--out", str(out), "--workdir", str(tmp_path / "work"), "--steps", "2",
           "--upstream-steps", "2", "--variants", "upstream,cold,warm,4prompts", "--budget", "3000", "--estimate-scale", "0"]
    # The time guard's estimates scaled to 0: every variant starts (a run with 1 s below skips all).
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=900)
    results = json.loads(out.read_text())
    variants = results["variants"]
    assert all(variants[n]["ok"] for n in ("upstream", "cold", "warm", "4prompts")), {n: v.get("error") for n, v in variants.items()}
    cold, warm = variants["cold"]["calls"], variants["warm"]["calls"]
    assert set(cold) == {"invert", "edit", "further_edit"} and len(cold["edit"]["step_times"]) == 1
    assert warm["invert"]["phases"]["invert"]["cache_hit"] is False, "warm inverts anew"
    assert list((tmp_path / "work" / "caches" / "default" / "cogedit").glob("*")), "warm and cold share a cache folder"
    assert variants["4prompts"]["prompts"] == 4 and "further_edit" not in variants["4prompts"]["calls"]
    assert variants["cold"]["attention"] == {"invert": "sdpa", "edit": "sdpa"}  # auto, on a CPU
    assert variants["upstream"]["extrapolated_total_s"] > variants["upstream"]["fixed_s"] > 0
    assert all(v["recompile_limit_hits"] == 0 for v in variants.values())
    assert (out.parent / "e2e-logs" / "cold.log").exists()

    guarded = tmp_path / "out" / "guarded.json"
    subprocess.run([*cmd[:5], str(guarded), *cmd[6:-4], "--budget", "1", "--estimate-scale", "1"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert set(json.loads(guarded.read_text())["skipped"]) == {"upstream", "cold", "warm", "4prompts"}

    report = tmp_path / "report"
    subprocess.run([sys.executable, "benchmarks/e2e.py", "report", str(out), "--out-dir", str(report)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    text = (report / "E2E.md").read_text()
    assert "EXTRAPOLATED" in text and "| cold |" in text and "4prompts (per prompt, 4 in one pass)" in text
    summary = json.loads((report / "e2e.json").read_text())["summary"]
    assert summary["rows"]["cold"]["first_vs_upstream"] > 0 and (report / "e2e.png").stat().st_size > 0


def _call(steps: int, step_s: float, before_s: float, decode: bool = True) -> dict:
    phases = {"encode": {"seconds": 5.0, "peak_bytes": 1, "cache_hit": False}}
    if decode:
        phases["decode"] = {"seconds": 5.0, "peak_bytes": 1, "cache_hit": None}
    wall = 5.0 + before_s + steps * step_s + (5.0 if decode else 0.0)
    return {"wall_s": wall, "steps": steps, "median_step_s": step_s, "before_first_step_s": before_s, "steps_s": steps * step_s,
            "phases": phases, "peak_vram_bytes": 2**30}


def _run(variants: dict, steps: int, skipped: dict | None = None) -> dict:
    return {"device": "GPU", "versions": {"torch": "t", "diffusers": "d", "torchao": "a"}, "date": "2026-11-30 01:42 UTC",
            "command": f"e2e.py run --steps {steps}", "steps": steps, "workload": {"frames": 49, "height": 480, "width": 720},
            "variants": variants, "skipped": skipped or {}}


def test_e2e_report_keeps_a_row_killed_after_its_calls_and_labels_derived_figures(tmp_path):
    """Runs at 50 and at 10 steps merged: the 50-step cold row counts though its process was
    killed after its calls, 10-step rows are derived, and the compile costs per phase follow."""
    from benchmarks.e2e import report

    both = {"invert": True, "edit": True}
    cold = {"ok": False, "error": "killed by the time guard after invert, edit, further_edit", "recompile_limit_hits": 0, "prompts": 1, "steps": 50,
            "compiled": both, "calls": {"invert": _call(50, 0.72, 37.9, False), "edit": _call(50, 3.0, 18.4), "further_edit": _call(50, 3.0, 4.3)}}
    eager = {"ok": True, "recompile_limit_hits": 0, "prompts": 1, "steps": 10, "compiled": {"invert": False, "edit": False},
             "calls": {"invert": _call(10, 0.88, 14.8, False), "edit": _call(10, 3.56, 3.3)}}
    upstream = {"ok": True, "recompile_limit_hits": 0, "timed_steps": 3, "per_step_s": {"invert": 1.8, "edit": 4.5}, "fixed_s": 10.0,
                "extrapolated_total_s": 325.0, "peak_vram_bytes": 2**35, "phases": {"load": {"seconds": 6.0}}}
    # The reporter resets the peak at each phase: the call's peak is its largest phase's, not its last's.
    cold["calls"]["edit"]["phases"]["edit"] = {"seconds": 150.0, "peak_bytes": 13 * 2**30, "cache_hit": False}
    paths = [tmp_path / "a.json", tmp_path / "c.json"]
    paths[0].write_text(json.dumps(_run({"cold": cold}, 50)))
    paths[1].write_text(json.dumps(_run({"upstream": upstream, "nocompile": eager}, 10, {"fp8": "estimated 169 s, 80 s left"})))
    report(paths, tmp_path / "out")
    text = (tmp_path / "out" / "E2E.md").read_text()
    rows: dict[str, str] = {}
    for line in text.splitlines():  # the first table's row of each variant
        rows.setdefault(line.split(" | ")[0].strip("| "), line)
    assert "| 50 | invert, edit | sdpa | 78.9 measured |" in rows["cold"] and "0.51x measured" in rows["cold"]
    assert rows["cold"].endswith("| 13.0 | 0 |"), "peak VRAM: the edit phase's 13 GiB"
    assert "| 10 | none | sdpa | 63.8 derived |" in rows["nocompile"], "10-step calls: + 40 median steps, labelled derived"
    assert "killed by the time guard" in text and "fp8: estimated" in text
    costs = json.loads((tmp_path / "out" / "e2e.json").read_text())["summary"]["compile"]
    assert round(costs["invert"]["cold"]["cost_s"], 1) == 23.1 and round(costs["edit"]["cold"]["saved_s"], 1) == 28.0
