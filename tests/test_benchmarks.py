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
