"""Every setting pinned by property: two settings share an inversion id, an edit's file names, a
batch's inversion, exactly when they give the same result; every CLI and web-app default is the
engine's; the web app's folder check holds for any path. No model runs: ids and names are pure
functions of the settings. Pairs come from Hypothesis (random, and near: one or two fields
changed), and every setting is also changed alone from every context that decides whether it
counts (the pairs a random search reaches least often).

"The same result" is written here from the documented rules, not read from the code:
- inversion: guidance counts only with CFG in effect (guidance > 1 and a negative prompt other
  than the source prompt: u + w(c - u) = u when c = u); fixed-point's refinements count (default
  1); frame requests count by the frames they pick; offloading and sliced MLPs do not, 8/4-bit
  weights, the dtype, compiling and fp8 do.
- edit: the negative prompt counts only with CFG (guidance > 1), the seed only with --init random,
  the injection's window, layers and reference only at strength > 0; the batch size, output
  folder, fps and the other file options never.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cache.keys import stable_hash
from engine.models.components import Runtime
from engine.models.model_info import inspect_model
from engine.models.plans import PLANS
from engine.options import EditOptions, InvertOptions, names
from engine.stages.decode import output_paths
from engine.stages.settings import parse_layers, parse_window
from engine.video.reader import FrameSettings, select_frame_indices
from engine.workflow import _edit_settings, _invert_settings, edit_stem, inversion_identity

# benchmarks/mutation.py runs fewer examples: every mutant reruns them.
SCALE = float(os.environ.get("COGEDIT_PROPERTY_SCALE", "1"))
PROPERTY = settings(max_examples=int(400 * SCALE), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLIP_FRAMES = 250  # a long clip: frame requests pick different frames
SOURCE = "a rabbit in a meadow"  # the inversion's source prompt, for --negative-from-source
# What each plan does to the weights (the rest is where they live, which changes no number).
WEIGHTS = {"staged": "bf16", "lean": "bf16", "offload": "bf16", "int8": "int8", "nf4": "nf4"}


@pytest.fixture(scope="module")
def info(tiny_model):
    return inspect_model(tiny_model)


def _runtime(r: dict) -> Runtime:
    # Built directly: the int8 and nf4 plans need a CUDA GPU to run, not to be named.
    return Runtime("cpu", r["dtype"], PLANS[r["plan"]], compile=r["compile"], fp8=r["fp8"])


RUNTIME = {
    "dtype": st.sampled_from([torch.float32, torch.bfloat16]),
    "plan": st.sampled_from(list(WEIGHTS)),
    "compile": st.booleans(),
    "fp8": st.booleans(),
}


def _effective_runtime(r: dict) -> tuple:
    return r["dtype"], WEIGHTS[r["plan"]], r["compile"], r["fp8"]


@st.composite
def near(draw, fields: dict[str, st.SearchStrategy], fix=lambda o: o, required: bool = False) -> tuple[dict, dict]:
    """Two settings, the second the first with one or two fields given another value or left out:
    random pairs alone would almost never differ only in a setting without effect."""
    a = draw(st.fixed_dictionaries(fields) if required else st.fixed_dictionaries({}, optional=fields))
    b = dict(a)
    for k in draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=2, unique=True)):
        if required or draw(st.integers(0, 3)):
            b[k] = draw(fields[k])
        else:
            b.pop(k, None)
    return fix(a), fix(b)


def pairs(fields: dict[str, st.SearchStrategy], fix=lambda o: o) -> st.SearchStrategy[tuple[dict, dict]]:
    """Near pairs, and pairs of two independent settings."""
    options = st.fixed_dictionaries({}, optional=fields)
    return st.one_of(near(fields, fix), st.tuples(options, options).map(lambda p: (fix(p[0]), fix(p[1]))))


# ------------------------------------------------------------------------------ inversions

PROMPTS = ["", SOURCE, "blurry, low quality"]
INVERT_VALUES = {
    "steps": [4, 5],
    "source_prompt": PROMPTS,
    "negative_prompt": PROMPTS,
    "guidance": [1.0, 4.5, 6.0],
    "frames": [9, 12, 13],
    "skip_start": [0, 1],
    "skip_end": [0, 2],
    "stride": [None, 1, 2],
    "height": [96, 112],
    "width": [160, 176],
    "fit": ["stretch", "crop", "pad"],
    "inversion": ["ddim", "fixed-point"],
    "inversion_iters": [None, 1, 2, 3],
}
INVERT = {k: st.sampled_from(v) for k, v in INVERT_VALUES.items()}
# The settings that decide whether another one counts.
INVERT_CONTEXTS = [
    dict(guidance=g, source_prompt=s, negative_prompt=n, inversion=m, inversion_iters=i)
    for g, s, n, m, i in itertools.product([1.0, 6.0], ["", SOURCE], PROMPTS, ["ddim", "fixed-point"], [None, 2])
]
DEFAULT_RUNTIME = {"dtype": torch.float32, "plan": "staged", "compile": False, "fp8": False}


def one_change(values: dict[str, list], contexts: list[dict], fix) -> list[tuple[dict, dict]]:
    """Every setting changed alone to every value, from every context: the pairs a random search
    reaches least often (a setting changed where it has no effect), swept whole."""
    return [(fix(base), fix({**base, field: v})) for base in contexts for field, vals in values.items() for v in vals]


def _refined_only_by_fixed_point(o: dict) -> dict:
    return {**o, "inversion": "fixed-point"} if o.get("inversion_iters") is not None else o  # iterations with ddim are refused


def inversion_id(info, options: dict, runtime: dict, video: str = "a" * 64) -> str:
    frames, invert = _invert_settings(InvertOptions(**options), info)
    return stable_hash(inversion_identity(video, frames, select_frame_indices(CLIP_FRAMES, frames), info, _runtime(runtime), invert))


def effective_inversion(info, options: dict, runtime: dict) -> tuple:
    own = info.defaults  # frames and size left out are the model's own
    o = dataclasses.replace(InvertOptions(**options), **{k: getattr(own, k) for k in ("frames", "height", "width") if options.get(k) is None})
    cfg = o.guidance > 1 and o.negative_prompt != o.source_prompt
    iters = (o.inversion_iters or 1) if o.inversion == "fixed-point" else 0
    picked = tuple(select_frame_indices(CLIP_FRAMES, FrameSettings(o.frames, o.skip_start, o.skip_end, o.stride, o.height, o.width, o.fit)))
    return (picked, o.height, o.width, o.fit, o.steps, o.source_prompt, (o.negative_prompt, o.guidance) if cfg else None, o.inversion, iters, *_effective_runtime(runtime))


@PROPERTY
@given(pair=pairs(INVERT, _refined_only_by_fixed_point), runtime=near(RUNTIME, required=True))
def test_two_inversions_share_an_id_exactly_when_they_give_the_same_trajectory(info, pair, runtime):
    (a, b), (ra, rb) = pair, runtime
    same = effective_inversion(info, a, ra) == effective_inversion(info, b, rb)
    event(f"same trajectory: {same}")  # --hypothesis-show-statistics: both kinds of pair come up
    assert (inversion_id(info, a, ra) == inversion_id(info, b, rb)) == same, (a, ra, b, rb)


def test_each_inversion_setting_changed_alone_changes_the_id_exactly_when_it_counts(info):
    rt = DEFAULT_RUNTIME
    wrong = [(a, b) for a, b in one_change(INVERT_VALUES, INVERT_CONTEXTS, _refined_only_by_fixed_point)
             if (inversion_id(info, a, rt) == inversion_id(info, b, rt)) != (effective_inversion(info, a, rt) == effective_inversion(info, b, rt))]
    assert not wrong, wrong[:3]


@pytest.mark.parametrize("iters", [(None, 2), (1, 3), (2, 3)])
def test_fixed_point_refinements_count_in_the_id(info, iters):
    a, b = ({"inversion": "fixed-point", "inversion_iters": n} for n in iters)
    assert inversion_id(info, a, DEFAULT_RUNTIME) != inversion_id(info, b, DEFAULT_RUNTIME)


# ------------------------------------------------------------------------------ edits

EDIT_VALUES = {
    "negative_prompt": ["", "blurry", SOURCE],
    "negative_from_source": [False, True],
    "guidance": [1.0, 4.5, 6.0],
    "init": ["inverted", "random"],
    "seed": [0, 1, 7],
    "inject_steps": ["0:1", (0.0, 1.0), "0:0.6", (0.0, 0.6), "0.2:0.8"],
    "inject_layers": [None, "all", "0", (0,), "0-1", (0, 1), "1"],
    "inject_strength": [0.0, 0.5, 1.0],
    "reference": ["shared", "per-half", "stored"],
    "batch": [1, 4],
    "fps": [None, 8.0],
    "out_dir": [".", "elsewhere"],
    "force": [False, True],
    "gpus": [1, 2],
    "mask_paste": [False, True],
}
EDIT = {k: st.sampled_from(v) for k, v in EDIT_VALUES.items()}
EDIT_CONTEXTS = [
    dict(guidance=g, init=i, inject_strength=s, negative_from_source=nfs, negative_prompt=n)
    for g, i, s, (nfs, n) in itertools.product([1.0, 6.0], ["inverted", "random"], [0.0, 1.0], [(False, ""), (False, "blurry"), (True, "")])
]


def _one_negative(o: dict) -> dict:
    return {**o, "negative_prompt": ""} if o.get("negative_from_source") else o  # the two together are refused


masks = st.sampled_from([None, "a" * 16, "b" * 16])  # a mask's digest (engine.video.masks.Mask.digest)


def _layers(value) -> tuple | None:
    layers = parse_layers(value) if isinstance(value, str) else value
    return None if layers is None else tuple(sorted(layers))


def effective_edit(options: dict, mask: str | None, runtime: dict) -> tuple:
    o = EditOptions(**options)
    negative = (SOURCE if o.negative_from_source else o.negative_prompt) if o.guidance > 1 else None
    window = parse_window(o.inject_steps) if isinstance(o.inject_steps, str) else tuple(o.inject_steps)
    inject = (window, _layers(o.inject_layers), o.inject_strength, o.reference) if o.inject_strength > 0 else None
    # The dtype is the inversion's (an edit refuses another), so its id, the names' first part, holds it.
    paste = o.mask_paste and mask is not None  # pastes through the mask: without one it is refused before any work
    return o.guidance, negative, o.init, o.seed if o.init == "random" else None, inject, mask, paste, *_effective_runtime(runtime)[1:]


def _stem(info, options: dict, mask: str | None, runtime: dict) -> tuple[str, tuple[str, ...]]:
    settings = dataclasses.replace(_edit_settings(EditOptions(**options), ("a watercolor painting",), info, SOURCE), mask=mask)
    return edit_stem("f" * 32, settings, _runtime(runtime)), settings.prompts


def edit_names(info, options: dict, mask: str | None, runtime: dict, out: Path) -> list[str]:
    videos, pairs = output_paths(*_stem(info, options, mask, runtime), out, force=True)
    return [p.name for p in videos + pairs]


@PROPERTY
@given(pair=pairs(EDIT, _one_negative), mask=st.one_of(masks.map(lambda m: (m, m)), st.tuples(masks, masks)), runtime=near(RUNTIME, required=True))
def test_two_edits_share_file_names_exactly_when_they_render_the_same_pixels(info, tmp_path, pair, mask, runtime):
    (a, b), (ma, mb), (ra, rb) = pair, mask, runtime
    same = effective_edit(a, ma, ra) == effective_edit(b, mb, rb)
    event(f"same pixels: {same}")
    named_a, named_b = edit_names(info, a, ma, ra, tmp_path), edit_names(info, b, mb, rb, tmp_path)
    assert (named_a == named_b) == same, (a, ma, ra, b, mb, rb)
    assert all(x != y for x, y in zip(named_a, named_b)) or same  # every file of the two is renamed, not only the first


def test_each_edit_setting_changed_alone_changes_the_names_exactly_when_it_counts(info):
    rt = DEFAULT_RUNTIME
    wrong = [(a, b) for a, b in one_change(EDIT_VALUES, EDIT_CONTEXTS, _one_negative)
             if (_stem(info, a, None, rt) == _stem(info, b, None, rt)) != (effective_edit(a, None, rt) == effective_edit(b, None, rt))]
    assert not wrong, wrong[:3]


# ------------------------------------------------------------------------------ batches

job_invert = st.fixed_dictionaries({}, optional={
    "steps": st.sampled_from([4, 50]),  # 50: the default, typed out
    "source_prompt": st.sampled_from(["", SOURCE]),
    "inversion": st.sampled_from(["ddim", "fixed-point"]),
    "frames": st.sampled_from([9, 49]),
})


@settings(max_examples=int(60 * SCALE), deadline=None)
@given(tables=st.lists(st.tuples(st.sampled_from(["a.mp4", "b.mp4"]), st.sampled_from(["m1", "m2"]), job_invert), min_size=1, max_size=6))
def test_a_batch_inverts_once_per_distinct_inversion(tables):
    from unittest import mock

    from engine.jobs.batch import Job, plan_units
    from engine.models.model_info import ModelDefaults

    jobs = [Job(f"job{n}", video, ("a watercolor painting",), model, invert) for n, (video, model, invert) in enumerate(tables)]
    # m1 and m2 are names, not folders: only the split's cost estimate reads a model's own sizes
    with mock.patch("engine.jobs.batch._model_defaults", return_value=ModelDefaults(49, 480, 720, 8.0)):
        inversions = [u for u in plan_units(jobs) if u.kind == "invert"]
    which = {job.name: n for n, u in enumerate(inversions) for job in u.jobs}
    assert sorted(which) == sorted(j.name for j in jobs)  # every job's inversion is planned, once

    def same(x: Job, y: Job) -> bool:
        return (x.video, x.model, InvertOptions(**x.invert)) == (y.video, y.model, InvertOptions(**y.invert))

    for x in jobs:
        for y in jobs:
            assert (which[x.name] == which[y.name]) == same(x, y), (x, y)


# ------------------------------------------------------------------------------ defaults

# The engine option a CLI parameter sets, where the names differ.
OPTION_OF = {"compile_blocks": "compile", "invert_guidance": "guidance", "invert_negative_prompt": "negative_prompt", "invert_fps": "fps"}
# Options with no flag of that command, and why.
NOT_A_FLAG = {
    "invert": {},
    "edit": {"output": "a Python return value", "skip_existing": "the batch's", "dtype": "the inversion's"},
    "run": {"output": "a Python return value", "skip_existing": "the batch's"},
}


def _normal(option: str, value):
    """A default as the engine reads it: windows and layers typed as text are parsed."""
    if option in ("inject_steps", "attention_steps") and isinstance(value, str):
        return parse_window(value)
    if option in ("inject_layers", "attention_layers") and isinstance(value, str):
        return parse_layers(value)
    return value


def _engine_default(command: str, param: str) -> tuple[str | None, object]:
    """The engine option `param` of `cogedit command` sets, and its default there (None, None: no option)."""
    option = OPTION_OF.get(param, param)
    classes = {"invert": [InvertOptions], "edit": [EditOptions], "run": [EditOptions, InvertOptions]}[command]
    if command == "run" and param.startswith("invert_"):
        classes = [InvertOptions]
    for cls in classes:
        if option in names(cls):
            return option, {f.name: f.default for f in dataclasses.fields(cls)}[option]
    return None, None


# What each command needs typed for click to parse it; every option is then at its default.
REQUIRED = {"invert": ["clip.mp4", "--model", "m"], "edit": ["abc"], "run": ["clip.mp4", "--model", "m"]}


@pytest.mark.parametrize("command", ["invert", "edit", "run"])
def test_every_cli_default_is_the_engines(command):
    from cli import cli

    cmd = cli.commands[command]
    parsed = cmd.make_context(command, list(REQUIRED[command])).params  # the values the command's function gets
    seen = set()
    for param in cmd.params:
        option, default = _engine_default(command, param.name)
        if option is None or param.required:
            continue
        seen.add(option)
        assert _normal(option, parsed[param.name]) == _normal(option, default), f"cogedit {command} {param.opts[0]}: {parsed[param.name]!r}, engine {default!r}"
    options = names(InvertOptions) if command == "invert" else names(EditOptions) | (names(InvertOptions) if command == "run" else set())
    required = {OPTION_OF.get(p.name, p.name) for p in cmd.params if p.required}
    assert options - seen - required == set(NOT_A_FLAG[command]), options - seen


def test_the_plan_commands_sizes_are_the_engines():
    from cli import cli

    defaults = {p.name: p.default for p in cli.commands["plan"].params}
    o = InvertOptions()
    assert (defaults["frames"], defaults["height"], defaults["width"]) == (o.frames, o.height, o.width)


# The option each web-app widget sets, and how the handler turns the widget's value into it.
WEB_INVERT = {
    "source_prompt": "source_prompt", "frames": "frames", "height": "height", "width": "width", "steps": "steps", "fit": "fit", "method": "inversion",
    "guidance": "guidance", "verify": "verify", "attention": "attention",
}
WEB_EDIT = {
    "inject_steps": "inject_steps", "inject_layers": "inject_layers", "strength": "inject_strength", "guidance": "guidance", "negative": "negative_prompt",
    "negative_source": "negative_from_source", "init": "init", "seed": "seed", "reference": "reference", "attention": "attention", "mask_fit": "mask_fit",
    "mask_paste": "mask_paste",
}


def test_every_web_app_default_is_the_engines(tiny_model, tmp_path):
    import gradio as gr

    from engine.models.model_info import inspect_model
    from webui.actions import app_config
    from webui.app import _edit_tab, _invert_tab
    from webui.folders import Folders

    cfg = app_config(str(tiny_model), Folders.make(tmp_path / "cache", tmp_path / "uploads"))
    with gr.Blocks():
        inv, ed = _invert_tab(cfg.invert_defaults, cfg.world), _edit_tab(cfg.prompts, cfg.examples, cfg.world)
    o, e = InvertOptions(), EditOptions()
    own = inspect_model(tiny_model).defaults  # what the engine's None means for frames and size: the model's own
    for widgets, opts, table in ((inv, o, WEB_INVERT), (ed, e, WEB_EDIT)):
        for widget, option in table.items():
            engine_value = getattr(opts, option)
            if engine_value is None and option in ("frames", "height", "width"):
                engine_value = getattr(own, option)
            assert _normal(option, getattr(widgets, widget).value) == _normal(option, engine_value), f"{widget}: {getattr(widgets, widget).value!r}, engine {engine_value!r}"
    assert inv.every.value is False and o.frames != "all"  # every frame: off, as the engine's default
    assert inv.plan.value == "auto" and o.plan is None  # auto: no plan given, the engine picks
    assert ed.mask_box.value == "" and e.mask_box is None  # empty: the handler passes no box
    assert ed.mask_box_end.value == "" and e.mask_box_end is None


# ------------------------------------------------------------------------------ the web app's folders


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/{cache, cache-old, uploads, uploads2, outside}, with links in and out of the two folders."""
    from webui.folders import Folders

    root = tmp_path_factory.mktemp("tree")
    folders = Folders.make(root / "cache", root / "uploads")
    for d in ("cache-old", "uploads2", "outside", "cache/inversions"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for d in ("cache", "cache-old", "uploads", "uploads2", "outside"):
        (root / d / "x.mp4").write_bytes(b"x")
        (root / d / "out").symlink_to(root / "outside")  # a link leaving the folder
        (root / d / "in").symlink_to(root / "uploads")  # a link into an allowed folder
    return root, folders


segments = st.lists(st.sampled_from(["cache", "cache-old", "uploads", "uploads2", "outside", "inversions", "out", "in", "..", ".", "x.mp4"]), min_size=1, max_size=5)


def _inside(path: str, root: Path) -> bool:
    """Independently of webui.folders: the real path, compared component by component."""
    real = Path(os.path.realpath(path)).parts
    return any(real[: len(allowed.parts)] == allowed.parts for allowed in (Path(os.path.realpath(root / "cache")), Path(os.path.realpath(root / "uploads"))))


@settings(max_examples=int(300 * SCALE), deadline=None)
@given(parts=segments)
def test_the_folder_check_accepts_exactly_the_paths_inside_the_two_folders(tree, parts):
    from engine.errors import SettingsError

    root, folders = tree
    path = os.path.join(root, *parts)
    if _inside(path, root):
        assert folders.check(path) == Path(os.path.realpath(path))
    else:
        with pytest.raises(SettingsError, match="is outside the cache and uploads folders"):
            folders.check(path)


def test_a_sibling_folder_whose_name_starts_like_the_cache_is_outside(tree):
    from engine.errors import SettingsError

    root, folders = tree
    for sibling in ("cache-old/x.mp4", "uploads2/x.mp4", "cache/../cache-old/x.mp4", "cache/out/x.mp4"):
        with pytest.raises(SettingsError, match="is outside"):
            folders.check(root / sibling)
    assert folders.check(root / "cache" / "in" / "x.mp4") == root.resolve() / "uploads" / "x.mp4"



def test_the_folders_are_made_where_asked_and_bundled_clips_copied_into_the_uploads(tmp_path):
    from engine.errors import SettingsError
    from engine.video.clips import CLIPS
    from webui.folders import Folders, bundled_names

    default = Folders.make(tmp_path / "c")
    assert default.uploads == (tmp_path / "c" / "uploads").resolve() and default.uploads.is_dir()
    nested = Folders.make(tmp_path / "c", tmp_path / "new" / "deep" / "uploads")  # again: both exist now for the cache
    assert nested.uploads == (tmp_path / "new" / "deep" / "uploads").resolve() and nested.uploads.is_dir()
    assert Folders.make(tmp_path / "c", tmp_path / "new" / "deep" / "uploads") == nested  # a second start finds them
    shutil.rmtree(nested.uploads)  # removed while the app runs: a bundled clip still lands in place
    first, second = (nested.bundled_clip(c.name) for c in CLIPS[:2])
    assert [copy for copy, _ in (first, second)] == [nested.uploads / "clips" / c.path.name for c in CLIPS[:2]]
    with pytest.raises(SettingsError) as err:
        nested.bundled_clip("nope")
    assert str(err.value) == f"no bundled clip is named 'nope'; pick one of {', '.join(bundled_names())}"
