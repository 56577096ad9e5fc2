"""The round-trip check (`--verify`) and fixed-point inversion, on the tiny model (CPU)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import engine
from engine.errors import SettingsError
from tests.conftest import SMALL

TEN = {**SMALL, "steps": 10}


def test_fixed_point_inverts_more_exactly_than_ddim(tiny_model, wide_clip, caplog):
    """Measured here (CPU, fp32, 10 steps): latent error 0.69 with DDIM, 0.27 with one refinement.
    The random model's first step (clean -> t=99) contracts slowly (about 0.5 per iteration);
    the trained proxy's numbers are in benchmarks/results/QUALITY.md. Each round trip says what
    its figure means, and a DDIM one that is not good points to fixed-point inversion."""
    ddim = engine.invert(wide_clip, tiny_model, device="cpu", verify=True, **TEN)
    assert ddim.verify["verdict"] == "failed"
    assert "the round trip is failed (latent error 0.6" in caplog.text  # 0.69 measured
    assert ">= 0.5: the inverted noise leads back to another picture); invert again with --inversion fixed-point — see docs/verify.md" in caplog.text
    caplog.clear()
    reporter = engine.Reporter()
    fixed = engine.invert(wide_clip, tiny_model, device="cpu", verify=True, inversion="fixed-point", reporter=reporter, **TEN)
    assert fixed.id != ddim.id
    assert fixed.verify["latent_rel_error"] < ddim.verify["latent_rel_error"] / 2, (ddim.verify, fixed.verify)
    assert fixed.verify["verdict"] == "poor" and "--inversion fixed-point" not in caplog.text and "other --steps" in caplog.text
    assert next(r.detail for r in reporter.records if r.name == "verify").endswith("dB: poor")
    detail = next(r.detail for r in reporter.records if r.name == "invert")
    forwards = float(detail.split("fixed-point: ")[1].split(" ")[0])
    assert forwards <= 3.0, detail  # the cap, on average per step


def test_verify_is_stored_with_the_entry(tiny_model, wide_clip):
    told = []
    reporter = engine.Reporter(listener=lambda name, done, steps: told.append((done, steps)) if name == "verify" else None)
    first = engine.invert(wide_clip, tiny_model, device="cpu", verify=True, reporter=reporter, **SMALL)
    (made,) = [r for r in reporter.records if r.name == "verify"]
    steps = SMALL["steps"]
    assert made.cache_hit is False and len(made.advances) == steps and told[0] == (0, steps) and told[-1] == (steps, steps)
    reporter = engine.Reporter()
    again = engine.invert(wide_clip, tiny_model, device="cpu", verify=True, reporter=reporter, **SMALL)
    assert again.verify == first.verify and set(first.verify) == {"latent_rel_error", "psnr_db", "verdict"}
    assert [(r.cache_hit, r.detail) for r in reporter.records if r.name == "verify"] == [(True, made.detail)]
    assert made.detail.startswith("round trip: latent error ") and made.detail.endswith(f"dB: {first.verify['verdict']}")
    assert engine.open_inversion(first.id).verify == first.verify


def test_invert_verify_json_ends_stdout(tiny_model, wide_clip):
    from cli import cli

    args = ["invert", str(wide_clip), "--model", str(tiny_model), "--device", "cpu", "--verify", "--json"]
    args += ["--frames", "9", "--height", "96", "--width", "160", "--steps", "4"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(last["verify"]) == {"latent_rel_error", "psnr_db", "verdict"} and list(last)[:2] == ["id", "verify"]


BAD_INVERSIONS = [
    ({"inversion": "exact"}, "--inversion"),
    ({"inversion_iters": 2}, "--inversion-iters"),
    ({"inversion": "fixed-point", "inversion_iters": 0}, "--inversion-iters"),
]


@pytest.mark.parametrize(("options", "flag"), BAD_INVERSIONS)
def test_bad_inversion_settings_are_refused(tiny_model, wide_clip, options, flag):
    with pytest.raises(SettingsError, match=flag):
        engine.invert(wide_clip, tiny_model, device="cpu", **options, **SMALL)


def test_verdict_limits_are_the_documented_ones():
    """docs/verify.md states the limits the code uses, and where they came from."""
    from pathlib import Path

    from engine.stages.verify import FAILED_FROM, GOOD_BELOW, verdict

    assert [verdict(e) for e in (0.0208, 0.1247, GOOD_BELOW, 0.3, FAILED_FROM, 1.06)] == ["good", "good", "poor", "poor", "failed", "failed"]
    doc = (Path(__file__).resolve().parents[1] / "docs" / "verify.md").read_text()
    assert f"below {GOOD_BELOW}" in doc and f"{FAILED_FROM} or more" in doc and "QUALITY.md" in doc
