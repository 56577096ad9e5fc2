"""`cogedit ui`: the page and its wiring. Every action is an engine or cache call; this file only
lays out the page and turns widget values into keyword options."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

import engine
from cache.edits import EditRecord, list_edits
from cache.layout import CacheLayout
from cache.sizes import format_size, parse_size
from cache.store import gc, remove_entry, total_size
from engine.errors import SettingsError
from engine.jobs.demo import DEMO_PROMPTS, DEMO_SETTINGS, demo_model
from engine.jobs.gallery import InversionCard, inversions, render_edits, thumbnail_strip
from engine.models.components import Runtime
from engine.models.model_info import inspect_model
from engine.options import EditOptions, InvertOptions
from engine.video.clips import CLIPS
from engine.video.reader import probe_video
from webui.folders import Folders
from webui.jobs import JobRunner, one_line

PLANS = ["auto", "staged", "lean", "int8", "nf4", "offload"]
VIDEO_TYPES = [".mp4", ".mov", ".mkv", ".webm", ".avi"]


@dataclass(frozen=True)
class AppConfig:
    model: str  # folder or hub id
    folders: Folders
    invert_defaults: dict[str, Any]  # steps, frames, height, width, source_prompt
    prompts: tuple[str, ...]  # the edit prompts the page starts with


def app_config(model: str | None, folders: Folders) -> AppConfig:
    """With no model, the shipped proxy at its own size (a CPU renders an edit in about a minute);
    a model given is checked now, so that a wrong path fails before the page opens."""
    if model is None:
        return AppConfig(str(demo_model(folders.cache)), folders, dict(DEMO_SETTINGS), DEMO_PROMPTS)
    inspect_model(model)
    d = InvertOptions()
    return AppConfig(str(model), folders, dict(steps=d.steps, frames=d.frames, height=d.height, width=d.width, source_prompt=d.source_prompt), ())


def _with_errors(fn):
    """For the quick handlers (no job): a failure shows as one line, never a traceback."""

    def wrapped(*args: Any) -> Any:
        try:
            return fn(*args)
        except gr.Error:
            raise
        except Exception as exc:
            raise gr.Error(one_line(exc), print_exception=False) from None

    wrapped.__name__ = fn.__name__
    return wrapped


def _inversion_md(card: InversionCard) -> str:
    s, inv = card.summary, card.settings.get("invert", {})
    fr = card.settings.get("frames", {})
    lines = [
        f"**{card.id[:12]}** · {s.get('video', '?')} · {card.state} · {format_size(card.size_bytes)} on disk",
        f"{s.get('frames', fr.get('max_frames', '?'))} frames at {fr.get('height', '?')}x{fr.get('width', '?')} ({fr.get('fit', '?')}), "
        f"{inv.get('steps', '?')} steps {inv.get('method', '')}, source prompt: “{inv.get('source_prompt', '')}”",
        f"model: {Path(str(s.get('model', '?'))).name} · {len(card.edits)} edit(s)",
    ]
    if card.verify:
        lines.append(f"round trip: latent error {card.verify['latent_rel_error']:.3g}, PSNR {card.verify['psnr_db']:.1f} dB")
    return "  \n".join(lines)


def _edit_label(r: EditRecord) -> str:
    o = r.settings
    return f"{r.prompt} · window {o.get('inject_steps')}, strength {o.get('inject_strength')}, guidance {o.get('guidance')} · {r.created[:16].replace('T', ' ')}"


def build(cfg: AppConfig) -> gr.Blocks:
    folders = cfg.folders
    runner = JobRunner(Runtime.default().device)
    d, e = cfg.invert_defaults, EditOptions()

    def cards() -> list[InversionCard]:
        return inversions(folders.cache)

    def inversion_choices(chosen: str | None = None) -> Any:
        done = [c for c in cards() if c.state == "complete"]
        choices = [(f"{c.id[:12]} · {c.summary.get('video', '?')} · {c.summary.get('steps', '?')} steps", c.id) for c in done]
        return gr.update(choices=choices, value=chosen if chosen in {c.id for c in done} else None)

    # ------------------------------------------------------------------ source clip
    @_with_errors
    def on_upload(file: str | None) -> tuple:
        if not file:
            return None, None, ""
        path = folders.check(file)
        info = probe_video(path)
        return str(path), str(path), f"{path.name}: {info.num_frames} frames, {info.width}x{info.height}, {info.fps:g} fps"

    @_with_errors
    def on_clip(name: str | None) -> tuple:
        if not name:
            return gr.update(), gr.update(), gr.update(), gr.update()
        path, clip = folders.bundled_clip(name)
        info = probe_video(path)
        return str(path), str(path), f"bundled {clip.name}: {info.num_frames} frames, {info.width}x{info.height}, {info.fps:g} fps", clip.captions[0]

    # ------------------------------------------------------------------ jobs
    def do_invert(source, source_prompt, frames, height, width, fit, steps, plan, method, verify, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        def job(reporter):
            if not source:
                raise SettingsError("no clip yet: upload one, or pick a bundled clip")
            opts = dict(frames=int(frames), height=int(height), width=int(width), fit=fit, steps=int(steps), inversion=method, verify=bool(verify), source_prompt=source_prompt)
            return engine.invert(folders.check(source), cfg.model, cache_dir=folders.cache, reporter=reporter, plan=None if plan == "auto" else plan, **opts)

        inv = runner.run(job, progress, request.session_hash)
        card = next(c for c in cards() if c.id == inv.id)
        return _inversion_md(card), str(thumbnail_strip(inv)), inversion_choices(inv.id)

    def do_render(inv_id, prompts_text, inject_steps, inject_layers, strength, guidance, init, seed, reference, request: gr.Request, progress=gr.Progress()):  # noqa: B008
        prompts = [p.strip() for p in (prompts_text or "").splitlines() if p.strip()]
        options = dict(inject_steps=inject_steps, inject_layers=inject_layers, inject_strength=float(strength), guidance=float(guidance), init=init, seed=int(seed), reference=reference)

        def job(reporter):
            if not inv_id:
                raise SettingsError("no inversion chosen: invert a clip first, or open one from the Inversions tab")
            return render_edits(inv_id, prompts, cache_dir=folders.cache, reporter=reporter, **options)

        records = runner.run(job, progress, request.session_hash)
        return records, earlier_choices(inv_id), _inversion_md(next(c for c in cards() if c.id == inv_id))

    def do_cancel(request: gr.Request) -> None:
        gr.Info(runner.cancel(request.session_hash))

    # ------------------------------------------------------------------ edits of one inversion
    def earlier_choices(inv_id: str | None) -> Any:
        edits = list_edits(CacheLayout(folders.cache).entry(inv_id)) if inv_id else []
        return gr.update(choices=[(_edit_label(r), r.video.name) for r in edits], value=[])

    @_with_errors
    def on_pick(inv_id: str | None) -> tuple:
        if not inv_id:
            return "", earlier_choices(None), []
        card = next((c for c in cards() if c.id == inv_id), None)
        if card is None:
            raise SettingsError(f"inversion {inv_id[:12]} is no longer in the cache; pick another")
        return _inversion_md(card), earlier_choices(inv_id), []

    @_with_errors
    def show_earlier(inv_id: str | None, names: list[str]) -> list[EditRecord]:
        # Names from the browser only select among the recorded edits: none becomes a path.
        edits = list_edits(CacheLayout(folders.cache).entry(inv_id)) if inv_id else []
        return [r for r in edits if r.video.name in set(names or [])]

    # ------------------------------------------------------------------ the gallery
    def gallery_view() -> tuple:
        """The cards (plain data, for a gr.State) and the cache's total."""
        all_cards = cards()
        views = [{"id": c.id, "md": _inversion_md(c), "thumbnails": str(c.thumbnails) if c.thumbnails else None} for c in all_cards]
        total = f"{len(all_cards)} inversion(s); the cache holds {format_size(total_size(CacheLayout(folders.cache)))} in `{folders.cache}`"
        return views, total

    @_with_errors
    def delete(inv_id: str) -> tuple:
        freed = remove_entry(CacheLayout(folders.cache), inv_id)
        gr.Info(f"removed {inv_id[:12]} ({format_size(freed)})")
        return (*gallery_view(), inversion_choices())

    @_with_errors
    def run_gc(max_size: str) -> tuple:
        try:
            limit = parse_size(max_size)
        except ValueError as exc:
            raise SettingsError(f"gc size: {exc}") from None
        removed = gc(CacheLayout(folders.cache), limit)
        gr.Info(f"gc removed {len(removed)} item(s), {format_size(sum(r.size_bytes for r in removed))}")
        return (*gallery_view(), inversion_choices())

    # ------------------------------------------------------------------ the page
    with gr.Blocks(title="cogedit", analytics_enabled=False) as app:
        gr.Markdown(f"## cogedit — invert once, edit many times\nmodel `{Path(cfg.model).name}` on {runner.device} · cache `{folders.cache}`")
        with gr.Tabs() as tabs:
            with gr.Tab("Invert", id="invert"):
                source = gr.State(None)
                with gr.Row():
                    with gr.Column():
                        upload = gr.File(label="upload a clip", file_types=VIDEO_TYPES, elem_id="upload")
                        clip = gr.Dropdown([c.name for c in CLIPS], value=None, label="or pick a bundled clip", elem_id="bundled")
                        preview = gr.Video(label="source", interactive=False, loop=True)
                        source_info = gr.Markdown(elem_id="source-info")
                    with gr.Column():
                        source_prompt = gr.Textbox(d["source_prompt"], label="source prompt (describe the clip)")
                        with gr.Row():
                            frames = gr.Number(d["frames"], label="frames (4k+1)", precision=0, minimum=1, elem_id="frames")
                            height = gr.Number(d["height"], label="height", precision=0, minimum=8)
                            width = gr.Number(d["width"], label="width", precision=0, minimum=8)
                        with gr.Row():
                            steps = gr.Number(d["steps"], label="steps", precision=0, minimum=1, elem_id="steps")
                            plan = gr.Dropdown(PLANS, value="auto", label="memory plan")
                        fit = gr.Radio(["stretch", "crop", "pad"], value="stretch", label="fit another shape")
                        method = gr.Radio(["ddim", "fixed-point"], value="ddim", label="inversion")
                        verify = gr.Checkbox(False, label="verify: measure the round trip's error")
                        with gr.Row():
                            invert_btn = gr.Button("Invert", variant="primary", elem_id="invert-button")
                            cancel_invert = gr.Button("Cancel", elem_id="cancel-invert")
                        card = gr.Markdown(elem_id="invert-card")
                        strip = gr.Image(label="thumbnails", interactive=False, elem_id="invert-thumbnails")

            with gr.Tab("Edit", id="edit"):
                with gr.Row():
                    pick = gr.Dropdown([], label="inversion", elem_id="edit-inversion", scale=2)
                    pick_info = gr.Markdown()
                with gr.Row():
                    prompts = gr.Textbox("\n".join(cfg.prompts), lines=4, label="prompts, one per line (add, remove or reorder lines)", elem_id="prompts", scale=2)
                    with gr.Column():
                        inject_steps = gr.Textbox("0:1", label="injection window (START:END of the steps)")
                        inject_layers = gr.Textbox("all", label="injection layers (all, or 0-9,20)")
                        strength = gr.Slider(0.0, 1.0, value=e.inject_strength, step=0.05, label="injection strength")
                    with gr.Column():
                        guidance = gr.Number(e.guidance, label="guidance (CFG)", minimum=1.0)
                        init = gr.Radio(["inverted", "random"], value=e.init, label="start from")
                        seed = gr.Number(e.seed, label="seed (start from random)", precision=0)
                        reference = gr.Radio(["shared", "per-half", "stored"], value=e.reference, label="reference")
                with gr.Row():
                    render_btn = gr.Button("Render all prompts", variant="primary", elem_id="render-button")
                    cancel_render = gr.Button("Cancel", elem_id="cancel-render")
                with gr.Row():
                    earlier = gr.Dropdown([], multiselect=True, label="earlier edits of this inversion (play again, no recomputing)", elem_id="earlier", scale=3)
                    play_btn = gr.Button("Play selected")
                shown = gr.State([])

                @gr.render(inputs=shown)
                def results(edits: list[EditRecord]) -> None:
                    if not edits:
                        gr.Markdown("Rendered edits play here, each beside its source (one video: the two halves play in step).")
                        return
                    with gr.Row(elem_id="results"):
                        for r in edits:
                            with gr.Column(min_width=300):
                                gr.Video(str(r.side_by_side), label=f"source | {r.prompt}", interactive=False, loop=True, autoplay=True, elem_classes="edit-result")
                                gr.Markdown(_edit_label(r))
                                gr.DownloadButton("download this edit (mp4)", value=str(r.video), size="sm")

            with gr.Tab("Inversions", id="inversions") as inversions_tab:
                total = gr.Markdown(elem_id="cache-total")
                with gr.Row():
                    max_size = gr.Textbox("10GB", label="gc: shrink the cache to (least recently used go first)", scale=3)
                    gc_btn = gr.Button("Run gc")
                    refresh_btn = gr.Button("Refresh")
                listed = gr.State([])

                @gr.render(inputs=listed)
                def gallery(views: list[dict]) -> None:
                    with gr.Column(elem_id="gallery"):
                        if not views:
                            gr.Markdown("No inversions in the cache yet.")
                        for v in views:
                            with gr.Row(elem_classes="inversion-card", equal_height=True):
                                if v["thumbnails"]:
                                    gr.Image(v["thumbnails"], show_label=False, interactive=False, height=90, scale=2, container=False)
                                gr.Markdown(v["md"])
                                with gr.Column(scale=1, min_width=180):
                                    open_b = gr.Button("Open in Edit", size="sm", variant="primary")
                                    delete_b = gr.Button("Delete…", size="sm", variant="stop")
                                    really_b = gr.Button(f"Delete {v['id'][:12]} and its edits for good", size="sm", variant="stop", visible=False)
                            # The card's id is bound here: no id from the browser picks what is opened or removed.
                            open_b.click(lambda i=v["id"]: (gr.Tabs(selected="edit"), inversion_choices(i)), None, [tabs, pick])
                            delete_b.click(lambda: gr.update(visible=True), None, really_b)
                            really_b.click(lambda i=v["id"]: delete(i), None, [listed, total, pick])

        # One GPU job at a time across the invert and the render: one concurrency group.
        gpu = dict(concurrency_id="gpu", concurrency_limit=1)
        upload.upload(on_upload, upload, [source, preview, source_info])
        upload.clear(lambda: (None, None, ""), None, [source, preview, source_info])
        clip.change(on_clip, clip, [source, preview, source_info, source_prompt])
        invert_btn.click(do_invert, [source, source_prompt, frames, height, width, fit, steps, plan, method, verify], [card, strip, pick], **gpu)
        render_btn.click(do_render, [pick, prompts, inject_steps, inject_layers, strength, guidance, init, seed, reference], [shown, earlier, pick_info], **gpu)
        for btn in (cancel_invert, cancel_render):
            btn.click(do_cancel, None, None, queue=False)
        pick.change(on_pick, pick, [pick_info, earlier, shown])
        play_btn.click(show_earlier, [pick, earlier], shown)

        app.load(gallery_view, None, [listed, total]).then(inversion_choices, None, pick)
        inversions_tab.select(gallery_view, None, [listed, total])
        refresh_btn.click(gallery_view, None, [listed, total])
        gc_btn.click(run_gc, max_size, [listed, total, pick])
    return app
