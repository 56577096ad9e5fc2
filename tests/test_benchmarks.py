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
