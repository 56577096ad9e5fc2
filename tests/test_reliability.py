"""Real processes: killed at exact points, interrupted, racing, read-only. Nothing is lost.

Each `cogedit` here is its own process (see tests/procs.py). A process is killed at a named point
through the fault-injection hook of cache/faults.py; the next run must resume and end with the
trajectory of an uninterrupted run, bit for bit, and a cache that `verify` finds sound.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import safetensors.torch
import torch

import engine
from cache.layout import CacheLayout
from cache.lock import entry_lock
from cache.manifest import read_manifest
from cache.store import verify
from tests.conftest import SMALL
from tests.procs import Forker

SMALL_ARGS = ["--frames", "9", "--height", "96", "--width", "160", "--steps", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def forker(tmp_path_factory):
    f = Forker(tmp_path_factory.mktemp("procs"))
    yield f
    f.close()


@pytest.fixture(scope="module")
def golden(tiny_model, wide_clip, tmp_path_factory) -> engine.Inversion:
    """The uninterrupted inversion, with stored attention on disk."""
    root = tmp_path_factory.mktemp("golden")
    return engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=root, attention_store="disk", **SMALL)


def _env(cache: Path, **extra: str) -> dict[str, str]:
    return {"COGEDIT_CACHE": str(cache), "COLUMNS": "250", **extra}  # wide: table cells stay on one line


def _same_as_golden(inv: engine.Inversion, golden: engine.Inversion) -> None:
    assert torch.equal(inv.latents(), golden.latents()) and torch.equal(inv.frames(), golden.frames())
    for a, b in zip(inv.trajectory(), golden.trajectory(), strict=True):
        assert torch.equal(a, b)


def _shards(inv: engine.Inversion) -> dict[str, dict[str, torch.Tensor]]:
    root = inv.paths.attention_dir
    return {p.relative_to(root).as_posix(): safetensors.torch.load_file(p) for p in sorted(root.rglob("*.safetensors"))}


# Point -> (extra invert flags, steps finished on disk when it dies: the manifest's "done").
KILL_POINTS = {
    "during encode": ("encode:1", [], None),
    "mid-write of a trajectory step": ("write:step_0001.safetensors:1", [], 1),
    "between steps": ("step:2", [], 2),
    "mid-write of a step's manifest": ("write:manifest.json:4", [], 1),  # 1 new, 2 encode, 3-6 steps, 7 complete
    "mid-write of the final manifest": ("write:manifest.json:7", [], 4),
    "mid-write of an attention block file": ("write:b_01.safetensors:3", ["--attention-store", "disk"], "any"),  # 3rd step's block 1
}


def test_killed_anywhere_resumes_to_the_same_result(forker, golden, tiny_model, wide_clip, tmp_path):
    """kill -9 at each point, and Ctrl-C between steps; every next run resumes bit for bit."""
    cases = {name: (at, flags, done, "SIGKILL") for name, (at, flags, done) in KILL_POINTS.items()}
    cases["ctrl-c between steps"] = ("step:2", [], 2, "SIGINT")
    assert len(KILL_POINTS) >= 5

    def invert(name, flags, **env):
        return forker.start("invert", wide_clip, "--model", tiny_model, *SMALL_ARGS, *flags, "--json", env=_env(tmp_path / name, **env))

    killed = {name: invert(name, flags, COGEDIT_TEST_KILL_AT=at, COGEDIT_TEST_KILL_SIGNAL=sig) for name, (at, flags, _, sig) in cases.items()}
    for name, child in killed.items():
        at, flags, done, sig = cases[name]
        forker.wait(child)
        if sig == "SIGINT":
            assert child.rc == 130 and "Traceback" not in child.stderr
            assert child.stderr.strip().splitlines()[-1] == "interrupted: finished steps are cached; run the same command again to resume"
        else:
            assert child.rc == -signal.SIGKILL, (name, child.stderr)
        layout = CacheLayout(tmp_path / name)
        manifest = read_manifest(layout.entry(golden.id).manifest)
        assert manifest["complete"] is False, name  # never taken for whole
        if done != "any":
            assert manifest["stages"].get("invert", {}).get("done") == done, name
        with pytest.raises(engine.CogeditError, match="is unfinished; run `cogedit invert` again"):
            engine.open_inversion(golden.id, layout.root)
        problems = verify(layout)
        assert all("leftover temporary file" in p.reason for p in problems), name  # nothing damaged
        if at.startswith("write:"):  # the half-written file is where verify and the next run's cleanup look
            assert problems, name

    resumed = {name: invert(name, cases[name][1]) for name in cases}
    for name, child in resumed.items():
        forker.wait(child)
        assert child.rc == 0 and json.loads(child.stdout)["cached"] is False, (name, child.stderr)
        done = cases[name][2]
        if isinstance(done, int) and done > 0:
            assert f"resumed at step {done}" in child.stderr, name
        layout = CacheLayout(tmp_path / name)
        assert verify(layout) == [], name  # leftovers of the killed write are gone too
        inv = engine.open_inversion(golden.id, layout.root)
        _same_as_golden(inv, golden)
        if "--attention-store" in cases[name][1]:
            ours, theirs = _shards(inv), _shards(golden)
            assert ours.keys() == theirs.keys()
            for shard in ours:
                assert all(torch.equal(ours[shard][k], theirs[shard][k]) for k in theirs[shard]), shard


def test_four_processes_invert_one_video_once(forker, golden, tiny_model, wide_clip, tmp_path):
    args = ("invert", wide_clip, "--model", tiny_model, *SMALL_ARGS, "--json")
    children = [forker.start(*args, env=_env(tmp_path / "cache")) for _ in range(4)]
    results = []
    for child in children:
        assert forker.wait(child).rc == 0, child.stderr
        results.append(json.loads(child.stdout))
    assert {r["id"] for r in results} == {golden.id}
    assert sorted(r["cached"] for r in results) == [False, True, True, True]  # computed once, reused thrice
    layout = CacheLayout(tmp_path / "cache")
    assert verify(layout) == []
    _same_as_golden(engine.open_inversion(golden.id, layout.root), golden)


def test_different_entries_do_not_wait_for_each_other(forker, golden, tiny_model, wide_clip, tmp_path):
    layout = CacheLayout(tmp_path / "cache")
    layout.ensure()
    args = ("invert", wide_clip, "--model", tiny_model, *SMALL_ARGS, "--json")
    with entry_lock(layout.entry(golden.id)):  # as if another process were computing this entry
        same = forker.start(*args, env=_env(layout.root))
        other = forker.start(*args, "--steps", "5", env=_env(layout.root))
        assert forker.wait(other, timeout=60).rc == 0, other.stderr
        assert json.loads(other.stdout)["id"] != golden.id
        assert forker.running(same) and not layout.entry(golden.id).manifest.exists()  # it waits its turn
    assert forker.wait(same).rc == 0, same.stderr
    assert json.loads(same.stdout) == {"id": golden.id, "dir": str(layout.entry(golden.id).dir), "cached": False}


def test_read_only_cache_serves_hits_and_edits(forker, golden, tiny_model, wide_clip, tmp_path):
    """Root ignores file modes, so as root the processes give up that power first."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    shutil.copytree(golden.layout.root, cache)
    folders = [cache, *(p for p in cache.rglob("*") if p.is_dir())]
    for folder in folders:
        folder.chmod(0o555)
    try:
        if os.geteuid() != 0 and os.access(cache, os.W_OK):
            pytest.skip("this user can write to read-only folders")
        env = _env(cache)
        hit = forker.start("invert", wide_clip, "--model", tiny_model, *SMALL_ARGS, "--json", env=env, obey_file_modes=True)
        edit = forker.start("edit", golden.id[:8], "--prompt", "a new prompt", "--out", out, "--device", "cpu", "--guidance", "1", env=env, obey_file_modes=True)
        miss = forker.start("invert", wide_clip, "--model", tiny_model, *SMALL_ARGS, "--steps", "5", env=env, obey_file_modes=True)

        assert forker.wait(hit).rc == 0, hit.stderr
        assert json.loads(hit.stdout)["cached"] is True
        assert forker.wait(edit).rc == 0, edit.stderr
        assert "prompt embedding not cached" in edit.stderr and len(list(out.glob("*.mp4"))) == 2
        assert forker.wait(miss).rc == 1 and "Traceback" not in miss.stderr
        error = miss.stderr.strip().splitlines()[-1]
        assert error.startswith("Error: cannot create lock file") and error.endswith("— pass --cache-dir to a writable folder or set COGEDIT_CACHE")
        def tree(root):
            return sorted(p.relative_to(root) for p in root.rglob("*"))

        assert tree(cache) == tree(golden.layout.root)  # nothing was written
    finally:
        for folder in folders:
            folder.chmod(0o755)


def test_overlong_prompt_warns_how_much_is_dropped(forker, golden, tiny_model, tmp_path):
    from transformers import AutoTokenizer

    shutil.copytree(golden.layout.root, tmp_path / "cache")
    prompt = "a watercolor painting of a city street at dusk, " * 30
    tokens = len(AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")(prompt).input_ids)
    assert tokens > 226
    child = forker.start("edit", golden.id[:8], "--prompt", prompt, "--out", tmp_path / "out", "--device", "cpu", "--guidance", "1", env=_env(tmp_path / "cache"))
    assert forker.wait(child).rc == 0, child.stderr
    assert f"prompt is {tokens} tokens; the model reads 226, so the last {tokens - 226} are dropped" in " ".join(child.stderr.split())
    assert "Token indices sequence length" not in child.stderr  # transformers' own, misleading line
