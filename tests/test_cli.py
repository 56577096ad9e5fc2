"""The main job through the command line, on a real clip: invert once, edit from the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
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


def test_invert_then_edit_from_the_cache(tiny_model, wide_clip, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_model.parent)  # the model as a relative folder, as `cogedit invert clip --model proxy`
    first = invoke("invert", wide_clip, "--model", tiny_model.name, *SMALL_ARGS)
    inversion_id = first.stdout.strip().splitlines()[-1]
    assert len(inversion_id) == 32 and "invert" in first.stderr  # the summary table

    components.LOAD_EVENTS.clear()
    again = json.loads(invoke("invert", wide_clip, "--model", tiny_model, *SMALL_ARGS, "--json").stdout)
    assert again["id"] == inversion_id
    assert components.LOAD_EVENTS == []  # a cache hit loads no model

    components.LOAD_EVENTS.clear()
    monkeypatch.chdir(tmp_path)  # editing from another folder finds the model: the inversion holds its absolute path
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
        assert _frames(e["side_by_side"]) == (9, (112, 320, 3))  # source | edit, over a band with the prompt
        band = decord.VideoReader(e["side_by_side"])[0].asnumpy()[96:]
        assert band.mean() < 50 and (band > 200).sum() > 100  # white text on black

    listing = invoke("cache", "ls", "--json").stdout
    assert json.loads(listing)[0]["id"] == inversion_id and json.loads(listing)[0]["complete"]
    _old_relative_model_names_the_fix(inversion_id, tiny_model, out)
    assert "all cached files verified" in invoke("cache", "verify").stdout
    assert inversion_id in invoke("cache", "show", inversion_id[:6]).stdout
    dry = invoke("cache", "gc", "--max-size", "0", "--dry-run").stdout
    assert f"would remove {inversion_id}" in dry  # and the prompt embeddings; nothing is removed

    assert "removed" in invoke("cache", "rm", inversion_id[:6]).stdout
    assert json.loads(invoke("cache", "ls", "--json").stdout) == []


def _old_relative_model_names_the_fix(inversion_id: str, model: Path, out: Path) -> None:
    """An older cogedit recorded the folder as typed: from another folder, the edit says how to name it."""
    manifest = Path(os.environ["COGEDIT_CACHE"]) / "inversions" / inversion_id / "manifest.json"
    m = json.loads(manifest.read_text())
    m["settings"]["model"]["source"] = model.name
    manifest.write_text(json.dumps(m))
    failed = CliRunner().invoke(cli, ["edit", inversion_id[:8], "--prompt", "snow", "--out", str(out)])
    assert failed.exit_code == 1 and f"model folder {model.name}, which is not there from here: pass the model's folder with edit --model" in failed.output
    invoke("edit", inversion_id[:8], "--prompt", "snow", "--out", out, "--model", model)


def test_run_is_invert_plus_edit(tiny_model, wide_clip, tmp_path):
    result = invoke("run", wide_clip, "--model", tiny_model, *SMALL_ARGS, "--prompt", "snow at night", "--out", tmp_path, "--json")
    printed = json.loads(result.stdout)
    (edit,) = printed["edits"]
    assert _frames(edit["video"]) == (9, (96, 160, 3))
    assert printed["cached"] is False and Path(printed["dir"]).name == printed["id"]  # the inversion too, as `invert --json` gives it
    text = invoke("run", wide_clip, "--model", tiny_model, *SMALL_ARGS, "--prompt", "snow at night", "--out", tmp_path / "again")
    assert text.stdout.splitlines()[0] == printed["id"] and len(text.stdout.splitlines()) == 3  # the id, then the two mp4 files


@pytest.mark.parametrize("command", ["invert", "edit", "run", "cache", "plan", "demo", "tiny-model"])
def test_help_shows_examples(command):
    assert "Usage:" in invoke(command, "--help").stdout


def test_demo_writes_both_halves(tmp_path):
    result = invoke("demo", "--out", tmp_path / "demo")
    videos = sorted((tmp_path / "demo").glob("*.mp4"))
    # bunny: reconstruction and edit, each with its side-by-side; shapes: source | color edit | masked color edit
    assert len(videos) == 5 and sum("side-by-side" in v.name for v in videos) == 2
    titles = [line.strip() for line in result.stderr.splitlines() if line.strip() in ("demo", "edit")]
    assert "decode" in result.stderr and "total" in result.stderr and titles == ["demo"]  # its table's title
    for v in videos:
        assert _frames(v)[0] == 17
    comparison = tmp_path / "demo" / "shapes-red-source-edit-masked.mp4"
    assert _frames(comparison) == (17, (112, 3 * 144, 3))  # source | edit | masked, over the prompt's band
    assert result.stdout.splitlines()[0] == str(comparison)  # what works comes first
    again = invoke("demo", "--out", tmp_path / "demo")  # a second run reuses the inversions and rewrites its own files
    assert sorted((tmp_path / "demo").glob("*.mp4")) == videos and "hit" in again.stderr


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


# ------------------------------------------------------------- every flag reaches the engine

# Flags that only shape what the CLI prints; every other flag of invert, edit and run must reach the engine.
CLI_ONLY = {
    "as_json": "prints the result as JSON instead of plain lines: nothing to pass on",
    "prompts_file": "the CLI reads it into the prompts it passes (test_cli_errors.py::test_prompts_file)",
}
# The engine option a flag sets, where the names differ (run's --invert-* go to its inversion).
OPTION_OF = {"compile_blocks": "compile", "invert_guidance": "guidance", "invert_negative_prompt": "negative_prompt", "invert_fps": "fps"}
# Flags the CLI checks or converts before calling the engine: the text typed and the value the engine gets.
TYPED = {"device": ("cpu", "cpu"), "vram": ("12GB", 12 * 2**30), "attention_budget": ("5GB", 5 * 10**9), "gpus": ("2", 2)}
# Engine options no flag sets, and why.
PYTHON_ONLY = {
    "output": "frames and latents are Python return values; the CLI writes mp4 files",
    "dtype": "an edit runs in its inversion's dtype (engine.edit refuses one); invert and run have --dtype",
    "skip_existing": "the batch's re-runs render only what is missing (cogedit batch); edit refuses existing files or --force overwrites them",
}
CALL_KEYWORDS = {"cache_dir", "reporter", "callback"}  # keywords of the call itself, not options
POSITIONAL = {"invert": ["video", "model"], "edit": ["inversion_id", "prompts"], "run": ["video", "model", "prompts"]}


class _Reached(Exception):
    pass


def _typed(param: click.Parameter, i: int) -> tuple[list[str], object]:
    """What to type for `param` so that it differs from its default and from the other flags,
    and the value the engine should get for it."""
    if param.name in TYPED:
        text, value = TYPED[param.name]
        return [param.opts[0], text], value
    if getattr(param, "is_flag", False):
        return [param.opts[0]], True
    if isinstance(param.type, click.Choice):
        value = [c for c in param.type.choices if c != param.default][-1]  # the last: bf16 is --dtype's first and --attention-dtype's second
    elif isinstance(param.type, click.types.IntParamType):
        value = (param.default or 0) + 100 + i
    elif isinstance(param.type, click.types.FloatParamType):
        value = (param.default or 0) + 0.5 + i
    else:
        value = f"{param.name}-{i}"
    tokens = [str(value)] if isinstance(param, click.Argument) else [param.opts[0], str(value)]
    return tokens, [value] if param.multiple else value


def _required(command: click.Command) -> list[click.Parameter]:
    # --prompt is required unless --prompts-file is given: the CLI checks that, not click.
    return [p for p in command.params if p.required or p.name == "prompts"]


def _arrived(command: str, args: tuple, kw: dict) -> dict[str, list]:
    """What the engine received, by CLI parameter name: the positional arguments, and each
    option as the engine's own option parsing reads it (for run, its invert's and its edit's)."""
    from engine.options import EditOptions, InvertOptions, RuntimeOptions, names, parse, split_run_options

    options = {k: v for k, v in kw.items() if k not in CALL_KEYWORDS}
    if command == "run":
        invert, edit = split_run_options(options)
        parsed = {"invert": invert, "edit": edit}
    else:
        parsed = {command: parse(InvertOptions if command == "invert" else EditOptions, options, command)}
    got = {name: [list(a) if isinstance(a, list | tuple) else a] for name, a in zip(POSITIONAL[command], args)}
    got["cache_dir"] = [kw.get("cache_dir")]
    for param in cli.commands[command].params:
        option = OPTION_OF.get(param.name, param.name)
        if param.name in got or param.name in CLI_ONLY:
            continue
        if command == "run" and option not in names(RuntimeOptions):
            # run's --invert-guidance is the inversion's; its other flags belong where their names do
            side = "invert" if param.name.startswith("invert_") or option not in names(EditOptions) else "edit"
            got[param.name] = [getattr(parsed[side], option)]
        else:
            got[param.name] = [getattr(opts, option) for opts in parsed.values()]
    return got


def _call(monkeypatch, command: str, tokens: list[str]) -> dict[str, list]:
    import engine

    calls = []

    def reached(*args, **kw):
        calls.append((args, kw))
        raise _Reached

    monkeypatch.setattr(engine, command, reached)
    result = CliRunner().invoke(cli, [command, *tokens])
    assert calls, result.output
    return _arrived(command, *calls[0])


@pytest.mark.parametrize(
    ("command", "param"),
    [(c, p) for c in ("invert", "edit", "run") for p in cli.commands[c].params if p.name not in CLI_ONLY],
    ids=lambda x: x if isinstance(x, str) else x.opts[0],
)
def test_every_flag_reaches_the_engine(monkeypatch, command, param):
    params = cli.commands[command].params
    typed = {p.name: _typed(p, i) for i, p in enumerate(params)}
    tokens = [t for p in _required(cli.commands[command]) if p is not param for t in typed[p.name][0]] + typed[param.name][0]
    got = _call(monkeypatch, command, tokens)
    assert got[param.name] and all(v == typed[param.name][1] for v in got[param.name]), f"{command} {param.opts[0]}: the engine got {got[param.name]}"


@pytest.mark.parametrize("command", ["invert", "edit", "run"])
def test_every_engine_option_has_a_flag(command):
    from engine.options import EditOptions, InvertOptions, RuntimeOptions, names

    invert, edit = names(InvertOptions), names(EditOptions)
    # run takes both; the inversion's options that the edit has too are named invert_* there.
    options = {"invert": invert, "edit": edit, "run": edit | invert | {f"invert_{o}" for o in invert & edit - names(RuntimeOptions)}}[command]
    flags = {OPTION_OF.get(p.name, p.name) if command != "run" or not p.name.startswith("invert_") else p.name for p in cli.commands[command].params}
    assert options - flags - set(PYTHON_ONLY) == set()
def test_output_names_hash_only_settings_that_change_the_pixels():
    """The 6-hex hash in an edit's file names: settings with no effect leave it alone (and the
    names of every edit made before stay what they were); the ones that count change it."""
    from engine.models.components import Runtime
    from engine.stages.settings import EditSettings, InjectSettings
    from engine.workflow import edit_stem

    def stem(**kw):
        return edit_stem("f9b069b144ba886d9949f628457eeb92", EditSettings(("a",), **kw), Runtime.default("cpu"))

    assert stem() == "f9b069b1-1db82c"  # the demo's name before and after: existing names are stable
    assert stem(seed=3) == stem()  # the tool warns that --seed has no effect here: it must not rename the files
    assert stem(guidance=1.0, negative_prompt="blur") == stem(guidance=1.0)  # no CFG: the negative prompt does nothing
    assert stem(inject=InjectSettings(window=(0, 0.5), strength=0.0)) == stem(inject=InjectSettings(strength=0.0))
    assert len({stem(), stem(init="random", seed=3), stem(init="random", seed=4), stem(negative_prompt="blur"), stem(guidance=2.5)}) == 5
    assert "6-character hash of the settings that" in invoke("edit", "--help").stdout


def test_long_prompts_are_cut_between_words():
    from engine.stages.decode import safe_name

    caption = "a big grey rabbit stretches an arm up in front of a burrow on a grassy hill"
    assert safe_name(caption, 0) == "00-a-big-grey-rabbit-stretches-an-arm-up-in-front-of-a-burrow"  # not "...-burrow-o"
    assert safe_name("x" * 80, 1) == "01-" + "x" * 60  # one long word: cut where it must be


def test_install_hints_name_the_source_install():
    """cogedit is installed from its source folder, not published: every hint says pip install -e."""
    assert 'pip install -e ".[fp8]"' in " ".join(invoke("invert", "--help").stdout.split())
    for path in [ROOT / "cli.py", ROOT / "README.md", *ROOT.glob("engine/**/*.py"), *ROOT.glob("docs/*.md")]:
        assert "cogedit[" not in path.read_text(), path
