"""Whatever goes wrong, `cogedit` exits non-zero with one line naming the problem and its fix.

The failures themselves are unit-tested beside their code (video files and frame selection in
test_video.py; checksums, manifests, locks and disk-full writes in test_cache.py); here they go
through the command line, with the engine's own guards: models, prompts, ids, GPU memory,
outputs, a disk that fills mid-inversion. Killed and racing processes are in test_reliability.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from click.testing import CliRunner

import cache.atomic
import engine
from cache.layout import CacheLayout
from cache.manifest import read_manifest
from cache.store import verify
from cli import cli
from engine.models import components
from engine.models.components import Runtime
from engine.stages.settings import EditSettings
from engine.workflow import edit_stem
from tests.conftest import SMALL, VIDEO_ERRORS
from tests.test_cli import _process
from tests.test_video import _ffmpeg, _testsrc

ROOT = Path(__file__).resolve().parents[1]
SMALL_ARGS = ["--frames", "9", "--height", "96", "--width", "160", "--steps", "4", "--device", "cpu"]


def cogedit(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def fails(*args: object, code: int = 1) -> str:
    """Run `cogedit ARGS`, check it failed cleanly, return its one error line."""
    result = cogedit(*args)
    assert isinstance(result.exception, SystemExit), result.exception  # nothing escaped the CLI
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def golden(tiny_model, wide_clip, tmp_path_factory) -> engine.Inversion:
    """A finished inversion with stored attention and cached prompts, to copy into a test's cache."""
    root = tmp_path_factory.mktemp("golden")
    inv = engine.invert(wide_clip, tiny_model, device="cpu", cache_dir=root, attention_store="disk", **SMALL)
    engine.edit(inv, ["a watercolor painting"], device="cpu", guidance=1.0, cache_dir=root, output="latents")
    return inv


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Broken and odd inputs, as test_video.py makes them (fewer: each costs a CLI run here)."""
    d = tmp_path_factory.mktemp("clips")
    c = {name: d / f"{name}.mp4" for name in ("missing", "folder", "empty", "text", "half", "audio", "zero", "one", "four", "ntsc")}
    c["folder"].mkdir()
    c["empty"].write_bytes(b"")
    c["text"].write_text("this is not a video\n")
    whole = _testsrc(d / "whole.mp4", "320x240", "25", 60).read_bytes()
    c["half"].write_bytes(whole[: len(whole) // 2])  # cut in half: the index at the end is gone
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(c["audio"]))
    for name, frames in (("zero", 0), ("one", 1), ("four", 4)):
        _testsrc(c[name], "176x144", "25", frames)
    _testsrc(c["ntsc"], "176x144", "30000/1001", 13)
    return c


@pytest.fixture
def entry(golden, _isolated_cache) -> engine.Inversion:
    """The golden inversion, copied into this test's cache."""
    shutil.copytree(golden.layout.root, _isolated_cache)
    return engine.open_inversion(golden.id)


# ------------------------------------------------------------------------------------ video input


@pytest.mark.parametrize(
    ("name", "expected"),
    [(name, VIDEO_ERRORS[name]) for name in ("missing", "folder", "empty", "text", "half", "audio", "zero", "one", "four")],
)
def test_bad_video(clips, tiny_model, name, expected):
    error = fails("invert", clips[name], "--model", tiny_model, *SMALL_ARGS)
    assert expected in error and " — " in error


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--frames", "0"], "--frames 0 is too small"),
        (["--frames", "-1"], "--frames -1 is too small"),
        (["--skip-start", "-1"], "--skip-start -1 is invalid"),
        (["--skip-end", "-5"], "--skip-end -5 is invalid"),
        (["--stride", "0"], "--stride 0 is invalid"),
        (["--steps", "0"], "--steps must be between 1 and 1000"),
        (["--steps", "-3"], "--steps must be between 1 and 1000"),
        (["--height", "100"], "--height"),
        (["--skip-start", "300"], "only 0 of 131 frames remain after --skip-start 300"),
        (["--skip-start", "60", "--skip-end", "60", "--stride", "4"], "only 3 of 131 frames remain"),
        (["--guidance", "0.5"], "--guidance must be >= 1"),
    ],
)
def test_bad_frame_and_step_settings(tiny_model, wide_clip, args, expected):
    assert expected in fails("invert", wide_clip, "--model", tiny_model, *SMALL_ARGS, *args)


def test_odd_size_and_rate_invert(clips, tiny_model):
    """176x144 at 29.97 fps, end to end, padded to keep its shape (4K sources: test_video.py
    checks their bounded decode; crop and stretch, their placement)."""
    result = cogedit("invert", clips["ntsc"], "--model", tiny_model, *SMALL_ARGS, "--fit", "pad", "--json")
    assert result.exit_code == 0, result.output
    inv = engine.open_inversion(json.loads(result.stdout)["id"])
    frames = inv.frames()
    assert frames.shape[1:] == (96, 160, 3)
    assert frames[:, :, :21].max() == 0 and frames[:, :, 21:139].float().mean() > 20  # 117 wide between bars
    assert inv.manifest["settings"]["frames"]["fit"] == "pad"  # in the key: a stretched inversion is another entry
    video = inv.manifest["settings"]["video"]
    assert (video["width"], video["height"], round(video["fps"], 2)) == (176, 144, 29.97)


# ------------------------------------------------------------------------------------------ model


def _variant(tiny_model: Path, tmp_path: Path, kind: str) -> str:
    if kind == "missing":
        return str(tmp_path / "no-such-model")
    if kind == "hub":
        return "THUDM/CogVideoX-5b"
    if kind == "file":
        return str(next((tiny_model / "transformer").glob("*.safetensors")))
    if kind == "2b":
        from engine.models.tiny import build_tiny_model

        return str(build_tiny_model(tmp_path / "tiny-2b", rotary=False))
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    if kind == "no-vae":
        shutil.rmtree(folder / "vae")
    if kind == "pickle":  # a .bin (pickle) checkpoint in place of the safetensors one
        weights = next((folder / "transformer").glob("*.safetensors"))
        torch.save(safetensors.torch.load_file(weights), folder / "transformer" / "diffusion_pytorch_model.bin")
        weights.unlink()
    return str(folder)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("missing", "does not exist: pass a CogVideoX-5b folder"),
        ("hub", "with no network, download it first (`hf download THUDM/CogVideoX-5b`; `huggingface-cli download` on an older huggingface_hub) or pass a local folder"),
        ("file", "is a file; pass the checkpoint folder"),
        ("no-vae", "is missing vae"),
        ("2b", "looks like CogVideoX-2B"),
        ("pickle", "has only pickled .bin weights for transformer, and cogedit loads safetensors only"),
    ],
)
def test_bad_model(tiny_model, wide_clip, tmp_path, monkeypatch, kind, expected):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import; no test may reach the hub
    model = _variant(tiny_model, tmp_path, kind)
    components.LOAD_EVENTS.clear()
    assert expected in fails("invert", wide_clip, "--model", model, *SMALL_ARGS)
    assert components.LOAD_EVENTS == []  # refused before any weights were read


@pytest.mark.parametrize("command", ["invert", "run"])
def test_a_missing_model_is_reported_before_the_video_is_read(tiny_model, wide_clip, tmp_path, _isolated_cache, command):
    """--frames 200 of a 131-frame clip would warn once the video is read: the model is checked
    first, so the one line is the only output and the cache folder is not made."""
    prompt = ["--prompt", "a cat"] if command == "run" else []
    result = cogedit(command, wide_clip, "--model", tmp_path / "no-such-model", *SMALL_ARGS, "--frames", "200", *prompt)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"Error: model folder {tmp_path / 'no-such-model'} does not exist: pass a CogVideoX-5b folder or a hub id like THUDM/CogVideoX-5b"]
    assert not _isolated_cache.exists()


def test_run_refuses_bad_edit_settings_before_inverting(tiny_model, wide_clip, _isolated_cache):
    components.LOAD_EVENTS.clear()
    assert "edit prompt is empty" in fails("run", wide_clip, "--model", tiny_model, *SMALL_ARGS, "--prompt", " ")
    assert "--inject-layers '99' names a layer outside" in fails("run", wide_clip, "--model", tiny_model, *SMALL_ARGS, "--prompt", "a cat", "--inject-layers", "99")
    both = ("give --negative-prompt or --negative-from-source, not both (the second uses the inversion's source prompt)")
    assert fails("run", wide_clip, "--model", tiny_model, *SMALL_ARGS, "--prompt", "a cat", "--negative-prompt", "a dog", "--negative-from-source") == f"Error: {both}"
    assert components.LOAD_EVENTS == [] and not _isolated_cache.exists()


def test_entry_of_another_model_has_another_key(entry, tiny_model, wide_clip, tmp_path):
    from engine.models.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)
    assert engine.invert(wide_clip, other, device="cpu", **SMALL).id != entry.id
    assert "was made with another model" in fails("edit", entry.id[:8], "--model", other, "--prompt", "a cat", "--device", "cpu")


# ----------------------------------------------------------------------------------------- device


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("cuda", "--device cuda: this torch has no CUDA (CPU build"),
        ("tpu", "--device tpu is not a device torch knows"),
        ("mps", "--device mps: cogedit runs on CUDA GPUs or the CPU"),
    ],
)
@pytest.mark.parametrize("command", ["invert", "run"])
def test_unusable_device_is_refused_before_anything_is_written(tiny_model, wide_clip, _isolated_cache, monkeypatch, command, device, expected):
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch, wherever the test runs
    monkeypatch.setattr(torch.version, "hip", None)
    components.LOAD_EVENTS.clear()
    prompt = ["--prompt", "a cat"] if command == "run" else []
    error = fails(command, wide_clip, "--model", tiny_model, *SMALL_ARGS, "--device", device, *prompt)
    assert expected in error and "--device cpu" in error
    assert not _isolated_cache.exists() and components.LOAD_EVENTS == []
    with pytest.raises(engine.SettingsError, match="no CUDA"):
        engine.invert(wide_clip, tiny_model, device="cuda", **SMALL)


# ---------------------------------------------------------------------------------------- prompts


def test_missing_and_empty_prompts(entry):
    assert "Missing option '--prompt': give --prompt TEXT (repeat it for several edits) or --prompts-file FILE" in fails("edit", entry.id[:8], code=2)
    for empty in ("", "   "):
        assert "edit prompt is empty" in fails("edit", entry.id[:8], "--prompt", "a cat", "--prompt", empty)
    with pytest.raises(engine.PromptError, match="no prompt given"):
        engine.edit(entry, [], device="cpu", output="latents")


def test_prompts_file(entry, tmp_path):
    """--prompts-file: one prompt a line, # comments and blank lines skipped, after any --prompt;
    `--prompt @file` is refused rather than rendered as the text "@file"."""
    listed = tmp_path / "prompts.txt"
    listed.write_text("# styles to try\na watercolor painting\n\n  a charcoal sketch  \n")
    result = cogedit("edit", entry.id[:8], "--prompt", "snow at night", "--prompts-file", listed, "--guidance", "1", "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    assert [e["prompt"] for e in json.loads(result.stdout)["edits"]] == ["snow at night", "a watercolor painting", "a charcoal sketch"]
    assert "'@prompts.txt' looks like a file: read prompts from it with --prompts-file prompts.txt" in fails("edit", entry.id[:8], "--prompt", "@prompts.txt", code=2)
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    assert "has no prompts (one a line" in fails("edit", entry.id[:8], "--prompts-file", tmp_path / "empty.txt", code=2)
    assert "does not exist" in fails("run", "clip.mp4", "--model", "m", "--prompts-file", tmp_path / "none.txt", code=2)


# ------------------------------------------------------------------------------------------ cache


def flip_bit(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


@pytest.mark.parametrize(
    ("file", "damage", "expected"),
    [
        ("trajectory/step_0002.safetensors", flip_bit, "trajectory/step_0002.safetensors fails its checksum"),
        ("trajectory/step_0003.safetensors", truncate, "trajectory/step_0003.safetensors is"),
        ("latents.safetensors", flip_bit, "latents.safetensors fails its checksum"),
        ("trajectory/step_0000.safetensors", Path.unlink, "trajectory/step_0000.safetensors is missing"),
        ("manifest.json", truncate, "has no readable manifest"),
    ],
)
def test_corrupt_entry_is_refused_not_used(entry, tmp_path, file, damage, expected):
    damage(entry.paths.dir / file)
    error = fails("edit", entry.id[:8], "--prompt", "a cat", "--device", "cpu", "--out", tmp_path)
    assert expected in error and f"cogedit cache rm {entry.id}" in error
    assert not list(tmp_path.glob("*.mp4"))


def test_manifest_from_a_newer_cogedit(entry, tiny_model, wide_clip):
    manifest = json.loads(entry.paths.manifest.read_text())
    entry.paths.manifest.write_text(json.dumps({**manifest, "format_version": 99}))
    for args in (["edit", entry.id[:8], "--prompt", "a cat"], ["invert", wide_clip, "--model", tiny_model, *SMALL_ARGS]):
        error = fails(*args)
        assert "written by a newer cogedit (format 99" in error and "upgrade cogedit or use another --cache-dir" in error


def test_cache_show_and_ls_read_well_at_80_columns(entry):
    runner = CliRunner(env={"COLUMNS": "80"})
    shown = runner.invoke(cli, ["cache", "show", entry.id[:8]]).stdout
    latents = entry.manifest["files"]["latents.safetensors"]["sha256"]
    store = next(iter(entry.manifest["attention"]))
    assert entry.id in shown and "complete" in shown and "stored attention" in shown and f"attention/{store}/ (" in shown
    assert latents[:12] in shown and latents not in shown  # short checksums, on one line each
    assert max(map(len, shown.splitlines())) <= 80
    details = json.loads(runner.invoke(cli, ["cache", "show", entry.id[:8], "--json"]).stdout)
    files = entry.manifest["files"]
    assert details["files"] == [{"file": rel, "bytes": files[rel]["bytes"], "sha256": files[rel]["sha256"]} for rel in sorted(files)]
    assert details["attention"] == entry.manifest["attention"] and details["state"] == "complete"
    listing = runner.invoke(cli, ["cache", "ls"]).stdout.splitlines()
    assert len(listing) == 3 and listing[2].startswith(f"{entry.id[:12]}  ") and max(map(len, listing)) <= 80  # title, header, one line an entry


def test_cache_ls_tells_entries_of_one_clip_apart(entry, tiny_model, wide_clip):
    """A DDIM and a fixed-point inversion of one clip differ in the inversion column; a setting
    outside the columns (here the source prompt) ends the line, cut at the terminal's width."""
    fixed = engine.invert(wide_clip, tiny_model, device="cpu", inversion="fixed-point", **SMALL)
    prompted = engine.invert(wide_clip, tiny_model, device="cpu", source_prompt="a rabbit", **SMALL)
    listing = CliRunner(env={"COLUMNS": "80"}).invoke(cli, ["cache", "ls"]).stdout
    rows = {line.split()[0]: line for line in listing.splitlines()[2:]}
    assert "fixed-point x1" in rows[fixed.id[:12]] and "ddim" in rows[entry.id[:12]] and "ddim" in rows[prompted.id[:12]]
    assert len(rows) == 3 and max(map(len, listing.splitlines())) <= 80
    wide = CliRunner(env={"COLUMNS": "300"}).invoke(cli, ["cache", "ls"]).stdout
    assert "--source-prompt 'a rabbit'" in wide and "--source-prompt ''" in wide
    listed = {e["id"]: e["inversion"] for e in json.loads(cogedit("cache", "ls", "--json").stdout)}
    assert listed == {entry.id: "ddim", fixed.id: "fixed-point x1", prompted.id: "ddim"}


def test_cache_show_gives_each_setting_once_as_its_flag(entry):
    shown = CliRunner(env={"COLUMNS": "120"}).invoke(cli, ["cache", "show", entry.id[:8]]).stdout
    assert "--dtype: 'fp32'" in shown and "--guidance: 6.0" in shown and "--inversion: 'ddim'" in shown and "--steps: 4" in shown
    assert "torch.float32" not in shown and "identity" not in shown and shown.count("guidance:") == 1
    # The id hashes guidance 1.0 here (source and negative prompts are both ""): one line says why.
    assert "the id records guidance 1.0: with the source prompt equal to the negative prompt, guidance changes nothing" in shown
    assert "9 frames used:" in shown
    details = json.loads(cogedit("cache", "show", entry.id[:8], "--json").stdout)
    assert details["settings"]["identity"]["invert"]["guidance"] == 1.0  # --json keeps the manifest whole


@pytest.mark.parametrize("command", [["cache", "ls"], ["cache", "show", "ID"]])
def test_cache_listing_imports_no_model_library(entry, command):
    """`cache ls`/`show` read JSON only: no torch or diffusers to import (2 s of a 2.5 s command)."""
    result = _process(*[entry.id[:8] if a == "ID" else a for a in command])
    assert entry.id[:12] in result.stdout  # ls: the id prefix every command takes
    assert not set(json.loads(result.stdout.splitlines()[-1])) & {"torch", "diffusers", "transformers", "safetensors", "numpy"}


def test_verify_finds_every_injected_corruption(entry):
    d = entry.paths.dir
    layout = entry.layout
    shard = sorted((d / "attention").rglob("*.safetensors"))[0]
    prompt = sorted(layout.prompts_dir.rglob("*.safetensors"))[0]
    others = [layout.entry(c * 32).dir for c in "ab"]
    manifest = json.loads(entry.paths.manifest.read_text())
    manifest["files"]["trajectory/step_0000.safetensors"]["sha256"] = "0" * 64
    injected = {
        "trajectory/step_0000.safetensors": lambda: entry.paths.manifest.write_text(json.dumps(manifest)),
        "trajectory/step_0001.safetensors": lambda: flip_bit(d / "trajectory/step_0001.safetensors"),
        "trajectory/step_0002.safetensors": lambda: truncate(d / "trajectory/step_0002.safetensors"),
        "trajectory/step_0003.safetensors": lambda: (d / "trajectory/step_0003.safetensors").unlink(),
        "frames.safetensors": lambda: flip_bit(d / "frames.safetensors", offset=-1000),
        "latents.safetensors": lambda: truncate(d / "latents.safetensors", size=5),
        entry.paths.relative(shard): lambda: flip_bit(shard),
        prompt.name: lambda: flip_bit(prompt),
        "trajectory/.step_0001.safetensors.tmp-1-abcd": lambda: (d / "trajectory/.step_0001.safetensors.tmp-1-abcd").write_bytes(b"half"),
        f"{others[0].name[:12]}  manifest.json": lambda: (others[0].mkdir(parents=True), (others[0] / "manifest.json").write_text("{not json")),
        f"{others[1].name[:12]}  manifest.json": lambda: (others[1].mkdir(parents=True), (others[1] / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))),
    }
    assert verify(layout) == []
    for inject in injected.values():
        inject()
    result = cogedit("cache", "verify")
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stdout.splitlines()
    for what in injected:
        assert sum(what in line for line in lines) == 1, (what, result.stdout)
    assert len(lines) == len(injected) == 11
    assert f"{len(injected)} problem(s) found" in result.stderr


def test_cache_holds_no_pickles(entry):
    """Every file in a used cache is safetensors, JSON or an empty lock file; none unpickles."""
    files = [p for p in entry.layout.root.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".safetensors", ".json", ".lock"}
    for p in files:
        data = p.read_bytes()
        if p.suffix == ".safetensors":
            with safetensors.safe_open(p, "pt") as f:
                assert f.keys()
        elif p.suffix == ".json":
            json.loads(data)
        else:
            assert data == b""
        assert not data.startswith((b"\x80", b"PK\x03\x04"))  # pickle protocol 2+, torch.save zip


# ------------------------------------------------------ failures mid-inversion leave it resumable


def _fail_writes(monkeypatch, name: str, code: int) -> None:
    real = cache.atomic._write_fully

    def write(fd, data):
        if name in os.path.basename(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(code, os.strerror(code))
        real(fd, data)

    monkeypatch.setattr(cache.atomic, "_write_fully", write)


def _gpu_oom_at_call(monkeypatch, n: int) -> None:
    from diffusers import CogVideoXTransformer3DModel

    real, calls = CogVideoXTransformer3DModel.forward, []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 23.64 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CogVideoXTransformer3DModel, "forward", forward)


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        ("disk full at step 2", "disk full while writing"),
        ("file too large at frames", "is larger than this filesystem or the process's file-size limit (ulimit -f)"),
        (
            "GPU out of memory at step 2",
            "the GPU ran out of memory in the invert phase (it asked for 20.00 GiB more); finished work is cached"
            " — run again with a smaller memory plan: --plan lean or --plan offload",
        ),
    ],
)
def test_failure_mid_inversion_leaves_it_resumable(golden, tiny_model, wide_clip, monkeypatch, failure, expected):
    with monkeypatch.context() as patch:
        if failure.startswith("disk full"):
            _fail_writes(patch, "step_0002", errno.ENOSPC)
        elif failure.startswith("file too large"):
            _fail_writes(patch, "frames", errno.EFBIG)
        else:
            _gpu_oom_at_call(patch, 3)
        assert expected in fails("invert", wide_clip, "--model", tiny_model, *SMALL_ARGS)
    layout = CacheLayout.from_dir()
    paths = layout.entry(golden.id)
    assert read_manifest(paths.manifest)["complete"] is False
    assert verify(layout) == []  # no partial file, no leftover: what is there is whole
    kept = {p: p.stat().st_mtime_ns for p in paths.trajectory_dir.glob("*.safetensors")}
    assert len(kept) == (2 if "step 2" in failure else 0)

    result = cogedit("invert", wide_clip, "--model", tiny_model, *SMALL_ARGS, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["cached"] is False
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # resumed: finished steps kept
    resumed = engine.open_inversion(golden.id)
    for a, b in zip(resumed.trajectory(), golden.trajectory(), strict=True):
        assert torch.equal(a, b)


def test_gpu_out_of_memory_in_an_edit(entry, monkeypatch, tmp_path):
    _gpu_oom_at_call(monkeypatch, 1)
    error = fails("edit", entry.id[:8], "--prompt", "a cat", "--device", "cpu", "--out", tmp_path)
    assert "out of memory in the edit phase" in error and "--plan lean or --plan offload" in error
    assert verify(entry.layout) == []


# ---------------------------------------------------------------- paths, outputs, ids, the rest


def test_unicode_paths_sanitized_names_and_no_overwrite(tiny_model, wide_clip, tmp_path):
    video = tmp_path / "my clips" / "vidéo été 🎬.mp4"
    video.parent.mkdir()
    shutil.copy(wide_clip, video)
    cache_dir, out = tmp_path / "cache dir ü", tmp_path / "out dir ü"
    result = cogedit("invert", video, "--model", tiny_model, *SMALL_ARGS, "--cache-dir", cache_dir, "--json")
    assert result.exit_code == 0, result.output
    inv_id = json.loads(result.stdout)["id"]

    prompts = ["../../etc/passwd", "ünïcödé " * 60]
    args = ["edit", inv_id[:8], *[a for p in prompts for a in ("--prompt", p)], "--cache-dir", cache_dir, "--out", out, "--device", "cpu", "--guidance", "1"]
    stem = edit_stem(inv_id, EditSettings(tuple(prompts), guidance=1.0), Runtime.default("cpu"))
    mine = out / f"{stem}-00-etc-passwd.mp4"  # where the first edit goes: not /etc/passwd
    out.mkdir()
    mine.write_bytes(b"the user's own file")
    components.LOAD_EVENTS.clear()
    assert "already exists; pass --force to overwrite it" in fails(*args)
    assert components.LOAD_EVENTS == []  # refused before any work
    assert sorted(out.iterdir()) == [mine] and mine.read_bytes() == b"the user's own file"

    result = cogedit(*args, "--force", "--json")
    assert result.exit_code == 0, result.output
    written = [Path(v) for e in json.loads(result.stdout)["edits"] for v in (e["video"], e["side_by_side"])]
    assert sorted(written) == sorted(out.iterdir()) and mine in written  # all in --out, nothing elsewhere
    assert mine.read_bytes() != b"the user's own file"
    for path in written:
        assert len(path.name) <= 100 and all(c.isascii() and (c.isalnum() or c in "-.") for c in path.name)

    assert "cannot create --out folder" in fails("edit", inv_id[:8], "--prompt", "x", "--cache-dir", cache_dir, "--out", video / "sub")


@pytest.mark.parametrize(
    "args",
    [
        ["edit", "../../etc", "--prompt", "x"],
        ["edit", "/etc/passwd", "--prompt", "x"],
        ["edit", "", "--prompt", "x"],
        ["cache", "show", "../../etc"],
        ["cache", "rm", "../inversions"],
    ],
)
def test_ids_are_validated_before_they_touch_a_path(args):
    assert "is not an id prefix" in fails(*args)


def test_unexpected_errors_are_one_line_and_debug_shows_them(monkeypatch, wide_clip):
    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(engine, "invert", boom)
    error = fails("invert", wide_clip, "--model", "m")
    assert error == "Error: unexpected RuntimeError: boom second line — run again with --debug for the traceback, and report it"
    assert isinstance(cogedit("--debug", "invert", wide_clip, "--model", "m").exception, RuntimeError)


def test_real_process_prints_one_line_and_debug_the_traceback(tmp_path):
    missing = tmp_path / "none.mp4"
    plain = subprocess.run([sys.executable, "cli.py", "invert", str(missing), "--model", str(tmp_path)],
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr.strip() == f"Error: {missing} does not exist — check the path"  # a blank line may precede it
    debug = cogedit("--debug", "invert", missing, "--model", tmp_path)
    assert isinstance(debug.exception, engine.VideoError)  # raised, with its traceback
