"""The main job through the command line, on a real clip: invert once, edit from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import decord
import pytest
from click.testing import CliRunner

from cli import cli
from engine.models import components

ROOT = Path(__file__).resolve().parents[1]
SMALL_ARGS = ["--frames", "9", "--height", "96", "--width", "160", "--steps", "4"]


def invoke(*args: str):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _frames(path) -> tuple[int, tuple[int, ...]]:
    reader = decord.VideoReader(str(path))
    return len(reader), reader[0].shape


def test_invert_then_edit_from_the_cache(tiny_model, wide_clip, tmp_path):
    first = invoke("invert", wide_clip, "--model", tiny_model, *SMALL_ARGS)
    inversion_id = first.stdout.strip().splitlines()[-1]
    assert len(inversion_id) == 32 and "invert" in first.stderr  # the summary table

    components.LOAD_EVENTS.clear()
    again = json.loads(invoke("invert", wide_clip, "--model", tiny_model, *SMALL_ARGS, "--json").stdout)
    assert again["id"] == inversion_id
    assert components.LOAD_EVENTS == []  # a cache hit loads no model

    components.LOAD_EVENTS.clear()
    out = tmp_path / "edits"
    result = invoke(
        "edit", inversion_id[:8], "--prompt", "a watercolor painting", "--prompt", "a charcoal sketch",
        "--inject-steps", "0:0.5", "--out", out, "--json",
    )
    assert [name for name, _ in components.LOAD_EVENTS] == ["text_encoder", "transformer", "vae"]
    edits = json.loads(result.stdout)["edits"]
    assert [e["prompt"] for e in edits] == ["a watercolor painting", "a charcoal sketch"]
    for e in edits:
        assert _frames(e["video"]) == (9, (96, 160, 3))
        assert _frames(e["side_by_side"]) == (9, (96, 320, 3))  # source | edit

    listing = invoke("cache", "ls", "--json").stdout
    assert json.loads(listing)[0]["id"] == inversion_id and json.loads(listing)[0]["complete"]
    assert "all cached files verified" in invoke("cache", "verify").stdout
    assert inversion_id in invoke("cache", "show", inversion_id[:6]).stdout
    dry = invoke("cache", "gc", "--max-size", "0", "--dry-run").stdout
    assert f"would remove {inversion_id}" in dry  # and the prompt embeddings; nothing is removed

    assert "removed" in invoke("cache", "rm", inversion_id[:6]).stdout
    assert json.loads(invoke("cache", "ls", "--json").stdout) == []


def test_run_is_invert_plus_edit(tiny_model, wide_clip, tmp_path):
    result = invoke("run", wide_clip, "--model", tiny_model, *SMALL_ARGS, "--prompt", "snow at night", "--out", tmp_path, "--json")
    (edit,) = json.loads(result.stdout)["edits"]
    assert _frames(edit["video"]) == (9, (96, 160, 3))


@pytest.mark.parametrize("command", ["invert", "edit", "run", "cache", "plan", "demo", "tiny-model"])
def test_help_shows_examples(command):
    assert "Usage:" in invoke(command, "--help").stdout


def test_demo_writes_two_edits_and_side_by_sides(tmp_path):
    result = invoke("demo", "--out", tmp_path / "demo")
    videos = sorted((tmp_path / "demo").glob("*.mp4"))
    assert len(videos) == 4 and sum("side-by-side" in v.name for v in videos) == 2
    assert "decode" in result.stderr and "total" in result.stderr
    for v in videos:
        assert _frames(v)[0] == 17


def _process(*args: object) -> subprocess.CompletedProcess:
    """`cogedit ARGS` in a fresh interpreter: what a user's terminal shows and, as the last line
    of stdout, the top-level packages it imported."""
    code = "import json, sys; from cli import cli; cli(sys.argv[1:], standalone_mode=False); print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_plan_imports_no_model_library():
    packages = json.loads(_process("plan", "--vram", "12GB").stdout.splitlines()[-1])
    assert not set(packages) & {"torch", "diffusers", "transformers", "torchao", "bitsandbytes"}  # answers in well under 2 s


def test_model_commands_print_no_third_party_warnings(tiny_model, wide_clip, tmp_path):
    result = _process("invert", wide_clip, "--model", tiny_model, *SMALL_ARGS[:-1], "1", "--cache-dir", tmp_path)
    # Our progress bars, summary table and one warning (the 636x270 clip is stretched to 160x96);
    # no torchao, triton or torch deprecation lines.
    others = [line for line in result.stderr.splitlines() if line.strip() and "━" not in line and line[:1] not in "┏┃┡│└" and line.strip() != "invert"]
    assert len(others) == 1 and "is 636x270 and is stretched to 160x96" in others[0], result.stderr
    assert "torchao" not in json.loads(result.stdout.splitlines()[-1])  # not even imported without --fp8
