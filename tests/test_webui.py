"""`cogedit ui` without a browser: the gallery and the edits kept in the cache, one job at a time
with progress, cancel and one-line errors, and what a request may read (the browser test is
test_webui_browser.py)."""

from __future__ import annotations

import json
import socket
import sys
from types import SimpleNamespace
from urllib.parse import quote

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
from engine.jobs.gallery import THUMBNAILS, inversions, render_edits
from engine.models import components
from tests.conftest import SMALL, free_port
from webui.folders import Folders
from webui.jobs import JobRunner


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


def test_cancel_stops_a_job_at_its_next_step_and_it_resumes_there(tiny_model, wide_clip):
    runner = JobRunner("cpu")
    shown: list[str] = []

    def show(value, desc):
        shown.append(desc)
        if desc.startswith("invert: step 1/"):
            assert runner.cancel("another tab") == "nothing of yours is running"
            runner.cancel("me")

    def job(reporter):
        return engine.invert(wide_clip, tiny_model, device="cpu", reporter=reporter, **SMALL)

    with pytest.raises(gr.Error) as err:
        runner.run(job, show, "me")
    assert err.value.message == "cancelled: the steps already finished are cached; run it again to resume" and err.value.title == "Cancelled"
    assert shown[:2] == ["video", "encode"] and "invert: step 0/4" in shown
    assert any(d.startswith("invert: step 1/4, ") and d.endswith(" s left") for d in shown)
    # Cancelled after step 1's report, it stops once step 2 is on disk; the rerun resumes there.
    reporter = engine.Reporter()
    engine.invert(wide_clip, tiny_model, device="cpu", reporter=reporter, **SMALL)
    assert [r.detail for r in reporter.records if r.name == "invert"] == ["resumed at step 2, attention sdpa"]


def test_a_failed_job_is_one_line_and_the_runner_takes_the_next(caplog):
    runner = JobRunner("cpu")

    def fails(exc):
        def job(reporter):
            raise exc

        with pytest.raises(gr.Error) as err:
            runner.run(job, lambda *a, **k: None, "me")
        return err.value.message

    assert fails(VideoError("clip.mp4 is not a readable video — re-encode it")) == "clip.mp4 is not a readable video — re-encode it"
    unexpected = fails(RuntimeError("boom\n  at line 3"))
    assert unexpected == "unexpected RuntimeError: boom at line 3 — the server's log has the traceback; please report it"
    assert "Traceback" in caplog.text  # for the server's log only
    assert runner.run(lambda reporter: 42, lambda *a, **k: None, "me") == 42


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
    copy, clip = folders.bundled_clip("bunny_heldout")
    assert copy.parent.parent == folders.uploads and copy.read_bytes() == clip.path.read_bytes()


def test_handlers_refuse_bad_requests_in_one_line(tmp_path, small_clip):
    from webui.actions import Actions, app_config

    act = Actions(app_config(None, Folders.make(tmp_path / "cache", tmp_path / "uploads")))
    clip = act.folders.uploads / "clip.mp4"
    clip.write_bytes(small_clip.read_bytes())
    me, quiet = SimpleNamespace(session_hash="me"), (lambda *a, **k: None)
    invert_defaults = dict(source_prompt="", frames=9, height=96, width=144, fit="stretch", steps=2, plan="auto", method="ddim", guidance=6.0, verify=False, attention="auto")

    def refused(handler, *args, **kwargs) -> str:
        with pytest.raises(gr.Error) as err:
            handler(*args, **kwargs)
        assert "\n" not in err.value.message
        return err.value.message

    assert refused(act.do_invert, None, **invert_defaults, request=me, progress=quiet) == "no clip yet: upload one, or pick a bundled clip"
    assert refused(act.do_invert, str(clip), **{**invert_defaults, "frames": None}, request=me, progress=quiet) == "frames is empty: enter a number"
    assert "/etc/passwd is outside the cache and uploads folders" in refused(act.do_invert, "/etc/passwd", **invert_defaults, request=me, progress=quiet)
    assert "is outside the cache and uploads folders" in refused(act.on_upload, str(tmp_path / "elsewhere.mp4"))
    edit = dict(prompts_text="snow", inject_steps="0:1", inject_layers="all", strength=1.0, guidance=6.0, negative="", negative_source=False, init="inverted", seed=0,
                reference="shared", mask_box="", attention="auto")
    assert refused(act.do_render, "", **edit, request=me, progress=quiet) == "no inversion chosen: invert a clip first, or open one from the Inversions tab"
    assert refused(act.do_render, "../../etc", **edit, request=me, progress=quiet).startswith("'../../etc' is not an id prefix")
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
    assert get(folders.cache / "demo-model" / "model_index.json").status_code == 200  # the proxy, copied into the cache
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


def test_a_local_edit_box_is_drawn_on_the_first_frame_and_reaches_the_edit(tmp_path, tiny_model, wide_clip):
    from webui.actions import Actions, app_config

    act = Actions(app_config(str(tiny_model), Folders.make(tmp_path / "cache", tmp_path / "uploads")))
    inv = engine.invert(wide_clip, tiny_model, cache_dir=act.folders.cache, device="cpu", **SMALL)
    frame = inv.frames()[0].numpy()
    h, w = frame.shape[:2]
    shown = act.on_box(inv.id, "0.25,0.25,0.75,0.75")
    assert shown.shape == frame.shape
    assert (shown[2, 2] == frame[2, 2] // 3).all()  # outside: kept, shown dimmed
    assert (shown[h // 2, w // 2] == frame[h // 2, w // 2]).all()  # inside: may change, shown as it is
    assert act.on_box(inv.id, "") is None and act.on_box(None, "0,0,1,1") is None
    with pytest.raises(gr.Error, match="is empty: it needs X0 < X1"):
        act.on_box(inv.id, "0.5,0.5,0.2,0.9")

    me, quiet = SimpleNamespace(session_hash="me"), (lambda *a, **k: None)
    edit = dict(prompts_text="snow", inject_steps="0:1", inject_layers="all", strength=1.0, guidance=1.0, negative="", negative_source=False, init="inverted", seed=0,
                reference="shared", attention="auto")
    (local,), _, _ = act.do_render(inv.id, **edit, mask_box="0.25,0.25,0.75,0.75", request=me, progress=quiet)
    (whole,), _, _ = act.do_render(inv.id, **edit, mask_box="", request=me, progress=quiet)
    assert local.settings["mask_box"] == "0.25,0.25,0.75,0.75" and "mask_box" not in whole.settings
    assert local.video != whole.video  # a local edit is its own edit, with its own name
    assert "negative_prompt" not in whole.settings  # none given: recorded as before


def test_negative_prompt_inversion_from_the_web_app(tmp_path, tiny_model, wide_clip):
    """Invert with guidance 1 and a source prompt, then edit with "negative prompt = the source
    prompt": the edit's negative prompt is the inversion's own source prompt, whatever the box says."""
    from engine.jobs.gallery import inversions
    from webui.actions import Actions, app_config, edit_label

    act = Actions(app_config(str(tiny_model), Folders.make(tmp_path / "cache", tmp_path / "uploads")))
    clip = act.folders.uploads / "clip.mp4"
    clip.write_bytes(wide_clip.read_bytes())
    me, quiet = SimpleNamespace(session_hash="me"), (lambda *a, **k: None)
    act.do_invert(str(clip), "a street at night", SMALL["frames"], SMALL["height"], SMALL["width"], "stretch", SMALL["steps"], "auto", "ddim", 1.0, False, "auto",
                  request=me, progress=quiet)
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
    with pytest.raises(gr.Error) as err:  # the kernel reaches the engine
        act.do_render(inv.id, **{**edit, "attention": "sage"}, negative_source=False, request=me, progress=quiet)
    assert err.value.message.startswith("--attention sage needs an NVIDIA GPU")
