"""`cogedit ui` without a browser: the gallery and the edits kept in the cache, one job at a time
with progress, cancel and one-line errors, and what a request may read (the browser test is
test_webui_browser.py)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import decord
import gradio as gr
import httpx
import pytest
from click.testing import CliRunner
from PIL import Image

import engine
from cache.edits import list_edits
from cache.layout import CacheLayout
from cache.store import remove_entry
from cli import cli
from engine.errors import SettingsError, VideoError
from engine.jobs.demo import SHAPES_MARGIN
from engine.jobs.gallery import THUMBNAILS, inversions, render_edits
from engine.models import components
from engine.video import shapes
from engine.video.clips import HELD_OUT
from tests.conftest import SMALL, free_port
from webui.folders import Folders
from webui.jobs import JobRunner, page_words


@pytest.fixture
def notices(monkeypatch) -> list[tuple[str, str]]:
    """The notices the page would show, (title, message)."""
    shown: list[tuple[str, str]] = []
    monkeypatch.setattr("webui.jobs.notify", lambda title, message: shown.append((title, message)))
    return shown


def test_edits_are_kept_beside_their_inversion_and_listed_in_the_gallery(tiny_model, wide_clip):
    inv = engine.invert(wide_clip, tiny_model, device="cpu", **SMALL)
    options = {"inject_steps": "0:0.5", "guidance": 1.0, "device": "cpu"}
    records = render_edits(inv, ["a watercolor painting", "snow at night"], **options)
    assert [r.prompt for r in records] == ["a watercolor painting", "snow at night"]
    for r in records:
        assert r.video.parent == r.side_by_side.parent == inv.paths.edits_dir
        assert r.video.stat().st_size > 0 and r.side_by_side.stat().st_size > 0
        assert r.settings == options
    last_used = json.loads(inv.paths.manifest.read_text())["last_used"]

    (card,) = inversions()
    assert card.id == inv.id and card.state == "complete" and card.summary["steps"] == SMALL["steps"]
    assert sorted(e.prompt for e in card.edits) == ["a watercolor painting", "snow at night"]
    assert card.size_bytes >= sum(f.stat().st_size for f in inv.paths.dir.rglob("*") if f.is_file()) > 0
    strip = Image.open(card.thumbnails)
    assert strip.height == 72 and strip.width == THUMBNAILS * round(SMALL["width"] * 72 / SMALL["height"])
    # Looking at the gallery is not a use: gc's least-recently-used order stays as it was.
    assert json.loads(inv.paths.manifest.read_text())["last_used"] == last_used

    # A prompt already rendered with the same options plays again: nothing is loaded or computed.
    components.LOAD_EVENTS.clear()
    assert render_edits(inv.id, ["snow at night"], **options) == [records[1]]
    assert components.LOAD_EVENTS == [] and len(list_edits(inv.paths)) == 2
    other = render_edits(inv.id, ["snow at night"], **{**options, "inject_steps": "0:1"})  # other options: a new edit
    assert other[0].video != records[1].video and len(list_edits(inv.paths)) == 3

    # A damaged record, or one naming a file outside the folder, is skipped, not followed.
    (inv.paths.edits_dir / "broken.json").write_text("{")
    evil = {"prompt": "x", "settings": {}, "video": "../../../../secret.mp4", "side_by_side": records[0].side_by_side.name, "created": "2099"}
    (inv.paths.edits_dir / "evil.json").write_text(json.dumps(evil))
    assert sorted(e.prompt for e in list_edits(inv.paths)) == ["a watercolor painting", "snow at night", "snow at night"]

    remove_entry(CacheLayout.from_dir(), inv.id)  # the edits leave with their inversion
    assert inversions() == [] and not inv.paths.edits_dir.exists()


def test_cancel_stops_a_job_at_its_next_step_and_it_resumes_there(tiny_model, wide_clip, notices):
    runner = JobRunner("cpu")
    shown: list[str] = []

    def show(value, desc):
        shown.append(desc)
        if desc.startswith("invert: step 1/"):
            assert runner.cancel("another tab") == "nothing of yours is running"
            runner.cancel("me")

    def job(reporter):
        return engine.invert(wide_clip, tiny_model, device="cpu", reporter=reporter, **SMALL)

    assert runner.run(job, show, "me")[0] is None
    assert notices[0] == ("Cancelled", "cancelled: the steps already finished are cached; run it again to resume")  # news, not an error
    assert shown[:2] == ["video", "encode"] and "invert: step 0/4" in shown
    assert any(d.startswith("invert: step 1/4, ") and d.endswith(" s left") for d in shown)
    # Cancelled after step 1's report, it stops once step 2 is on disk; the rerun resumes there.
    reporter = engine.Reporter()
    engine.invert(wide_clip, tiny_model, device="cpu", reporter=reporter, **SMALL)
    assert [r.detail for r in reporter.records if r.name == "invert"] == ["resumed at step 2, attention sdpa"]


def test_a_failed_job_is_one_line_and_the_runner_takes_the_next(caplog, notices):
    runner = JobRunner("cpu")

    def fails(exc):
        def job(reporter):
            raise exc

        assert runner.run(job, lambda *a, **k: None, "me") == (None, [])  # no panel is filled, or marked failed
        title, message = notices.pop()
        assert title == "Error"
        return message

    assert fails(VideoError("clip.mp4 is not a readable video — re-encode it")) == "clip.mp4 is not a readable video — re-encode it"
    unexpected = fails(RuntimeError("boom\n  at line 3"))
    assert unexpected == "unexpected RuntimeError: boom at line 3 — the server's log has the traceback; please report it"
    assert "Traceback" in caplog.text  # for the server's log only
    assert runner.run(lambda reporter: 42, lambda *a, **k: None, "me") == (42, []) and notices == []


def test_messages_use_the_pages_labels_and_file_names(tmp_path):
    uploads = tmp_path / "uploads"
    text = f"{uploads}/3f9a0c2e/notes.mp4 is not a readable video; --inject-steps 0:2 is outside 0-1; pass --fit crop or --fit pad; /etc/passwd."
    assert page_words(text, (uploads,)) == (
        'notes.mp4 is not a readable video; injection window 0:2 is outside 0-1; pass fit "crop" or fit "pad"; /etc/passwd.'
    )


def test_only_the_cache_and_the_uploads_folder_are_reachable(tmp_path):
    folders = Folders.make(tmp_path / "cache", tmp_path / "uploads")
    (tmp_path / "secret.txt").write_text("secret")
    (folders.uploads / "clip.mp4").write_bytes(b"x")
    (folders.uploads / "link.mp4").symlink_to(tmp_path / "secret.txt")
    assert folders.check(folders.uploads / "clip.mp4") == folders.uploads / "clip.mp4"
    assert folders.check(folders.cache / "inversions" / "x") == folders.cache / "inversions" / "x"
    for bad in (tmp_path / "secret.txt", f"{folders.uploads}/../secret.txt", folders.uploads / "link.mp4", "/etc/passwd", "relative.mp4"):
        with pytest.raises(SettingsError, match="is outside the cache and uploads folders"):
            folders.check(bad)
    with pytest.raises(SettingsError, match="no bundled clip is named '../secret'"):
        folders.bundled_clip("../secret")
    copy, caption = folders.bundled_clip("bunny_heldout")
    assert copy.parent.parent == folders.uploads and copy.read_bytes() == HELD_OUT.path.read_bytes() and caption == HELD_OUT.captions[0]
    drawn, caption = folders.bundled_clip("shapes_heldout_4")  # a held-out shapes clip, drawn into the uploads folder
    assert drawn.parent.parent == folders.uploads and caption == "a yellow triangle moving right on a gray background"


def test_handlers_refuse_bad_requests_in_one_line(tmp_path, small_clip, notices):
    from webui.actions import Actions, app_config

    act = Actions(app_config(None, Folders.make(tmp_path / "cache", tmp_path / "uploads")))
    clip = act.folders.uploads / "clip.mp4"
    clip.write_bytes(small_clip.read_bytes())
    me, quiet = SimpleNamespace(session_hash="me"), (lambda *a, **k: None)
    invert_defaults = dict(source_prompt="", frames=9, height=96, width=144, fit="stretch", steps=2, plan="auto", method="ddim", guidance=6.0, verify=False, attention="auto")

    def refused(handler, *args, **kwargs) -> str:
        returned = handler(*args, **kwargs)
        assert all(r == gr.skip() for r in returned)  # every panel stays as it was
        ((title, message),) = notices
        notices.clear()
        assert title == "Error" and "\n" not in message
        return message

    assert refused(act.do_invert, None, **invert_defaults, request=me, progress=quiet) == "no clip yet: upload one, or pick a bundled clip"
    assert refused(act.do_invert, str(clip), **{**invert_defaults, "frames": None}, request=me, progress=quiet) == "frames is empty: enter a number"
    assert "/etc/passwd is outside the cache and uploads folders" in refused(act.do_invert, "/etc/passwd", **invert_defaults, request=me, progress=quiet)
    assert "is outside the cache and uploads folders" in refused(act.on_upload, str(tmp_path / "elsewhere.mp4"))
    edit = dict(prompts_text="snow", inject_steps="0:1", inject_layers="all", strength=1.0, guidance=6.0, negative="", negative_source=False, init="inverted", seed=0,
                reference="shared", mask_box="", attention="auto")
    assert refused(act.do_render, "", **edit, request=me, progress=quiet) == "no inversion chosen: invert a clip first, or open one from the Inversions tab"
    assert refused(act.do_render, "../../etc", **edit, request=me, progress=quiet).startswith("'../../etc' is not an id prefix")
    assert refused(act.do_render, "abc", **{**edit, "prompts_text": " \n"}, request=me, progress=quiet) == "write at least one prompt, one per line"
    assert "gc size: cannot read size 'lots'" in refused(act.run_gc, "lots")
    assert act.on_upload(str(clip))[2] == "clip.mp4: 47 frames, 430x242, 25 fps"


@pytest.fixture
def gradio_env(monkeypatch):
    for var in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE", "GRADIO_ANALYTICS_ENABLED"):
        monkeypatch.setenv(var, "")  # webui.start sets them; monkeypatch puts them back after the test


@pytest.fixture
def served(tmp_path, gradio_env):
    import webui

    app = webui.start(None, "127.0.0.1", free_port(), tmp_path / "cache", tmp_path / "uploads")
    yield app, Folders.make(tmp_path / "cache", tmp_path / "uploads")
    app.close()


def test_requests_cannot_read_outside_the_cache_and_uploads(served, tmp_path):
    app, folders = served
    (tmp_path / "secret.txt").write_text("the-secret-content")
    (folders.uploads / "mine.txt").write_text("mine")
    (folders.uploads / "link.txt").symlink_to(tmp_path / "secret.txt")
    url = app.local_url.rstrip("/")

    def get(path) -> httpx.Response:
        return httpx.get(f"{url}/gradio_api/file={quote(str(path), safe='')}")

    assert get(folders.uploads / "mine.txt").status_code == 200
    assert get(folders.cache / "demo-model-shapes" / "model_index.json").status_code == 200  # the proxy, copied into the cache
    for outside in (tmp_path / "secret.txt", f"{folders.uploads}/../secret.txt", folders.uploads / "link.txt", "/etc/passwd"):
        response = get(outside)
        assert response.status_code == 403 and "the-secret-content" not in response.text, outside

    # A request that names a file outside as an upload is refused before any handler runs.
    call = httpx.post(f"{url}/gradio_api/call/on_upload", json={"data": [{"path": str(tmp_path / "secret.txt"), "meta": {"_type": "gradio.FileData"}}]})
    stream = httpx.get(f"{url}/gradio_api/call/on_upload/{call.json()['event_id']}").text
    assert "event: error" in stream and "the-secret-content" not in stream


def test_ui_refuses_a_wrong_model_in_one_line(tmp_path, gradio_env):
    result = CliRunner().invoke(cli, ["ui", "--model", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: model folder") and len(result.output.strip().splitlines()) == 1


def test_ui_on_a_taken_port_is_one_line(tmp_path, gradio_env):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli, ["ui", "--port", str(port), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 1
    assert result.output == f"Error: cannot serve on 127.0.0.1:{port} (in use, or not an address of this machine) — pass another --port, or --host 127.0.0.1\n"


def test_ui_without_gradio_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # what an install without the ui extra sees
    result = CliRunner().invoke(cli, ["ui"])
    assert result.exit_code == 1 and result.output == 'Error: the web app needs the ui extra: pip install -e ".[ui]" in the cogedit source folder\n'


def test_a_local_edit_box_is_drawn_on_the_first_and_last_frames_and_reaches_the_edit(tmp_path, tiny_model, wide_clip):
    from webui.actions import Actions, app_config

    act = Actions(app_config(str(tiny_model), Folders.make(tmp_path / "cache", tmp_path / "uploads")))
    inv = engine.invert(wide_clip, tiny_model, cache_dir=act.folders.cache, device="cpu", **SMALL)
    frame, last = inv.frames()[0].numpy(), inv.frames()[inv.entry.output_frames - 1].numpy()
    h, w = frame.shape[:2]
    assert (w, h) == (160, 96)  # shown enlarged 2x (to 192 px high), first | last frame 4 px apart

    def at(shown, frame_no, y, x):  # the preview's pixel at a frame's (y, x)
        return shown[2 * y, frame_no * (2 * w + 4) + 2 * x]

    shown, hint = act.on_box(inv.id, "0.25,0.25,0.75,0.75")
    assert shown.shape == (2 * h, 2 * (2 * w) + 4, 3) and hint == ""
    assert (at(shown, 0, 2, 2) == frame[2, 2] // 3).all()  # outside: kept, shown dimmed
    assert (at(shown, 0, h // 2, w // 2) == frame[h // 2, w // 2]).all()  # inside: may change, shown as it is
    assert (at(shown, 1, h // 2, w // 2) == last[h // 2, w // 2]).all()  # one box: the same on the last frame
    # the last frame's box on the last frame: its left third is kept
    moved, _ = act.on_box(inv.id, "0.25,0.25,0.75,0.75", "0.5,0.25,1,0.75")
    assert (at(moved, 1, h // 2, w // 3) == last[h // 2, w // 3] // 3).all() and (at(moved, 0, h // 2, w // 3) == frame[h // 2, w // 3]).all()
    assert act.on_box(None, "0,0,1,1") == (None, "")
    bare, _ = act.on_box(inv.id, "")  # no box: both frames as they are (the whole frame may change), ready to draw on
    assert (bare[::2, : 2 * w : 2] == frame).all() and (bare[::2, 2 * w + 4 :: 2] == last).all()
    # a box being typed: the last preview stays, a line under it says what is wrong, in the page's words
    assert act.on_box(inv.id, "0.5,0.5,0.2,0.9") == (gr.skip(), "local edit box '0.5,0.5,0.2,0.9' is empty: it needs X0 < X1 and Y0 < Y1")
    assert act.on_box(inv.id, "0,0,1,1", "0,0,1") == (gr.skip(), "box on the last frame takes four fractions of the frame X0,Y0,X1,Y1 like 0.25,0.2,0.75,0.8, got '0,0,1'")

    # Two clicks on a frame draw its box (rounded outwards to hundredths); a click on the other frame starts again there.
    def click(x, y, corner):  # (x, y) on the frame, in the frame's px
        return act.on_draw(inv.id, corner, gr.SelectData(None, {"index": [2 * x, 2 * y], "value": None}))

    first = click(40, 24, None)[2]
    assert first == ["first", 0.25, 0.25]
    assert click(81, 49, first) == ("0.25,0.25,0.51,0.52", gr.skip(), None)  # 81/160 = 0.506, 49/96 = 0.510
    corner = click(w + 2 + 159, 95, first)[2]  # on the last frame (after the 4 px gap, 2 px at the frame's scale): a new first corner there
    assert corner[0] == "last"
    assert click(w + 2 + 80, 0, corner) == (gr.skip(), "0.5,0,1,0.99", None)  # 159/160 = 0.994, 95/96 = 0.990

    me, quiet = SimpleNamespace(session_hash="me"), (lambda *a, **k: None)
    edit = dict(prompts_text="snow", inject_steps="0:1", inject_layers="all", strength=1.0, guidance=1.0, negative="", negative_source=False, init="inverted", seed=0,
                reference="shared", attention="auto")
    (local,), _, _ = act.do_render(inv.id, **edit, mask_box="0.25,0.25,0.75,0.75", request=me, progress=quiet)
    (whole,), _, _ = act.do_render(inv.id, **edit, mask_box="", request=me, progress=quiet)
    (moving,), _, _ = act.do_render(inv.id, **edit, mask_box="0.25,0.25,0.75,0.75", mask_box_end="0.5,0.25,1,0.75", request=me, progress=quiet)
    assert local.settings["mask_box"] == "0.25,0.25,0.75,0.75" and "mask_box" not in whole.settings
    assert moving.settings["mask_box_end"] == "0.5,0.25,1,0.75" and "mask_box_end" not in local.settings and moving.video != local.video
    assert local.video != whole.video  # a local edit is its own edit, with its own name
    assert "negative_prompt" not in whole.settings  # none given: recorded as before
    # Only around the moving object: a clip that is not a bundled shapes clip has no known object.
    assert act.do_render(inv.id, **edit, mask_box="", object_mask=True, request=me, progress=quiet) == (gr.skip(),) * 3


def test_a_bundled_shapes_clip_knows_where_its_object_is(tmp_path):
    """The mask 'only around the moving object' uses (the render with it: the browser test)."""
    folders = Folders.make(tmp_path / "cache", tmp_path / "uploads")
    path = folders.object_mask("shapes_heldout_4.mp4")
    assert path.parent.parent == folders.uploads
    mask = decord.VideoReader(str(path)).get_batch(list(range(17))).asnumpy().mean(-1) > 127
    assert (mask == shapes.around(shapes.clip_spec(4, "heldout"), SHAPES_MARGIN)).mean() > 0.99  # the object's own place, frame by frame
    with pytest.raises(SettingsError, match="clip.mp4 is not a bundled shapes clip, so where its object is is not known: draw a box around it instead"):
        folders.object_mask("clip.mp4")


def test_negative_prompt_inversion_from_the_web_app(tmp_path, tiny_model, wide_clip, notices):
    """Invert with guidance 1 and a source prompt, then edit with "negative prompt = the source
    prompt": the edit's negative prompt is the inversion's own source prompt, whatever the box says."""
    from engine.jobs.gallery import inversions
    from webui.actions import Actions, app_config, edit_label

    act = Actions(app_config(str(tiny_model), Folders.make(tmp_path / "cache", tmp_path / "uploads")))
    clip = act.folders.uploads / "clip.mp4"
    clip.write_bytes(wide_clip.read_bytes())
    me, quiet = SimpleNamespace(session_hash="me"), (lambda *a, **k: None)
    card = act.do_invert(str(clip), "a street at night", SMALL["frames"] + 1, SMALL["height"], SMALL["width"], "stretch", SMALL["steps"], "auto", "ddim", 1.0, False, "auto",
                         request=me, progress=quiet)[0]
    # what the engine changed on its own is on the page: on the card and as a notice
    changed = f"frames {SMALL['frames'] + 1}: using {SMALL['frames']}, as the model takes 4k+1 frames"
    stretched = "clip.mp4 is 636x270 and is stretched to 160x96"
    assert changed in card and stretched in card and [t for t, m in notices if changed in m or stretched in m] == ["Note", "Note"]
    inv = engine.open_inversion(inversions(act.folders.cache)[0].id, act.folders.cache)
    assert inv.entry.source_prompt == "a street at night" and inv.manifest["settings"]["invert"]["guidance"] == 1.0
    edit = dict(prompts_text="snow", inject_steps="0:1", inject_layers="all", strength=1.0, guidance=6.0, negative="ignored", init="inverted", seed=0,
                reference="shared", mask_box="", attention="auto")
    (npi,), _, _ = act.do_render(inv.id, **edit, negative_source=True, request=me, progress=quiet)
    (other,), _, _ = act.do_render(inv.id, **edit, negative_source=False, request=me, progress=quiet)
    (typed,), _, _ = act.do_render(inv.id, **{**edit, "negative": "a street at night"}, negative_source=False, request=me, progress=quiet)
    assert npi.settings["negative_from_source"] is True and "negative_prompt" not in npi.settings and other.settings["negative_prompt"] == "ignored"
    assert npi.video == typed.video != other.video  # the same edit as typing the source prompt: the same file
    assert "negative: the source prompt" in edit_label(npi)
    notices.clear()  # the kernel reaches the engine (its refusal in the page's words)
    assert act.do_render(inv.id, **{**edit, "attention": "sage"}, negative_source=False, request=me, progress=quiet) == (gr.skip(),) * 3
    assert notices[0][0] == "Error" and notices[0][1].startswith('attention kernel "sage" needs an NVIDIA GPU')


@pytest.mark.parametrize("world", ["shapes", "bunny"])
def test_the_page_starts_on_a_clip_its_proxy_never_saw_with_the_prompts_it_knows(tmp_path, world):
    from webui.actions import app_config

    cfg = app_config(None, Folders.make(tmp_path / "cache", tmp_path / "uploads"), world)
    clip = {"shapes": "shapes_heldout_4", "bunny": "bunny_heldout"}[world]
    assert cfg.invert_defaults["clip"] == clip and cfg.invert_defaults["verify"] and cfg.world == world
    assert cfg.invert_defaults["source_prompt"] == cfg.folders.bundled_clip(clip)[1]
    known = {"shapes": "a red circle moving left on a gray background", "bunny": "a big grey rabbit climbs out of a burrow in a grassy hill"}[world]
    assert known in cfg.examples and Path(cfg.model).name == ("demo-model-shapes" if world == "shapes" else "demo-model")
