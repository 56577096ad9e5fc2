"""`cogedit ui`: the page, tab by tab, and its wiring; the handlers are `webui.actions.Actions`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from cache.edits import EditRecord
from engine.hooks.attention import CHOICES as ATTENTION
from engine.models.plans import PLANS as ENGINE_PLANS
from engine.options import EditOptions, InvertOptions
from engine.stages.settings import INVERSIONS
from engine.video.reader import FITS
from webui.actions import Actions, AppConfig, edit_label
from webui.folders import bundled_names

PLANS = ["auto", *ENGINE_PLANS]  # "auto": no --plan, the engine picks
VIDEO_TYPES = [".mp4", ".mov", ".mkv", ".webm", ".avi"]


def _invert_tab(d: dict, world: str) -> SimpleNamespace:
    o, c = InvertOptions(), SimpleNamespace(source=gr.State(None))
    with gr.Row():
        with gr.Column():
            c.upload = gr.File(label="upload a clip", file_types=VIDEO_TYPES, elem_id="upload")
            c.clip = gr.Dropdown(bundled_names(world or "shapes"), value=d["clip"], label="or pick a bundled clip", elem_id="bundled")
            c.preview = gr.Video(label="source", interactive=False, loop=True)
            c.source_info = gr.Markdown(elem_id="source-info")
        with gr.Column():
            c.source_prompt = gr.Textbox(d["source_prompt"], label="source prompt (describe the clip)")
            with gr.Row():
                c.frames = gr.Number(d["frames"], label="frames (4k+1)", precision=0, minimum=1, elem_id="frames")
                c.height = gr.Number(d["height"], label="height", precision=0, minimum=8)
                c.width = gr.Number(d["width"], label="width", precision=0, minimum=8)
            with gr.Row():
                c.steps = gr.Number(d["steps"], label="steps", precision=0, minimum=1, elem_id="steps")
                c.plan = gr.Dropdown(PLANS, value=o.plan or "auto", label="memory plan")
                c.attention = gr.Dropdown(list(ATTENTION), value=o.attention, label="attention kernel (sage: lossy)", elem_id="invert-attention")
            c.fit = gr.Radio(list(FITS), value=o.fit, label="fit another shape")
            c.method = gr.Radio(list(INVERSIONS), value=o.inversion, label="inversion")
            c.guidance = gr.Number(o.guidance, label="inversion guidance (CFG; 1 = none, for negative-prompt inversion)", minimum=1.0, elem_id="invert-guidance")
            c.verify = gr.Checkbox(d["verify"], label="verify: measure the round trip's error (good, poor or failed)")
            c.every = gr.Checkbox(False, label="every frame at the model's rate (a clip longer than the model's window runs in overlapping windows)", elem_id="every-frame")
            c.every_info = gr.Markdown(elem_id="every-info")
            with gr.Row():
                c.run = gr.Button("Invert", variant="primary", elem_id="invert-button")
                c.cancel = gr.Button("Cancel", elem_id="cancel-invert")
            c.card = gr.Markdown(elem_id="invert-card")
            c.to_edit = gr.Button("Edit this inversion →", visible=False, elem_id="to-edit")
            c.strip = gr.Image(label="thumbnails", interactive=False, elem_id="invert-thumbnails")
    return c


def _known(examples: tuple[str, ...]) -> str:
    if not examples:
        return ""
    listed = "\n".join(f"- {p}" for p in examples)
    return f"This proxy knows only the words of its training captions; prompts like these (change a word: a color, a shape):\n{listed}"


def _edit_tab(prompts: tuple[str, ...], examples: tuple[str, ...], world: str) -> SimpleNamespace:
    e, c = EditOptions(), SimpleNamespace(shown=gr.State([]))
    with gr.Row():
        c.pick = gr.Dropdown([], label="inversion", elem_id="edit-inversion", scale=2)
        c.pick_info = gr.Markdown()
    with gr.Row():
        with gr.Column(scale=2):
            c.prompts = gr.Textbox("\n".join(prompts), lines=4, label="prompts, one per line (add, remove or reorder lines)", elem_id="prompts")
            gr.Markdown(_known(examples), elem_id="known-prompts")
        with gr.Column():
            c.inject_steps = gr.Textbox("0:1", label="injection window (START:END of the steps)", info="steps that copy the source's attention: longer keeps more of its layout")
            c.inject_layers = gr.Textbox("all", label="injection layers (all, or 0-9,20)", info="transformer blocks that copy it: fewer lets the prompt change more")
            c.strength = gr.Slider(0.0, 1.0, value=e.inject_strength, step=0.05, label="injection strength", info="0 = off, 1 = as the original method")
        with gr.Column():
            c.guidance = gr.Number(e.guidance, label="guidance (CFG)", minimum=1.0)
            c.negative = gr.Textbox(e.negative_prompt, label="negative prompt")
            c.negative_source = gr.Checkbox(False, label="negative prompt = the source prompt (negative-prompt inversion: invert with guidance 1)", elem_id="negative-source")
            c.init = gr.Radio(["inverted", "random"], value=e.init, label="start from")
            c.seed = gr.Number(e.seed, label="seed (start from random)", precision=0)
            c.reference = gr.Radio(["shared", "per-half", "stored"], value=e.reference, label="reference",
                                   info="where the copied attention comes from: one shared row (fast), the original method's row per half, or stored while inverting")
            c.attention = gr.Dropdown(list(ATTENTION), value=e.attention, label="attention kernel (sage: lossy)", elem_id="edit-attention")
    with gr.Row():
        with gr.Column(scale=2):
            c.mask_box = gr.Textbox("", label="local edit: a box X0,Y0,X1,Y1 in fractions of the frame (empty: the whole frame)", placeholder="0.25,0.2,0.75,0.8", elem_id="mask-box")
            c.mask_box_end = gr.Textbox("", label="box on the last frame (optional: the box moves from the first frame's to it, following a moving object)",
                                        placeholder="0.5,0.2,1,0.8", elem_id="mask-box-end")
            c.box_hint = gr.Markdown(elem_id="box-hint")
            c.mask_fit = gr.Radio([("the whole box", "none"), ("only the object in it", "object")], value=e.mask_fit, label="inside the box, change", elem_id="mask-fit",
                                  info="the object: the box shrinks, frame by frame, to what stands apart from its edge, so a color edit does not paint the box")
            c.mask_paste = gr.Checkbox(e.mask_paste, label="keep everything outside the mask exactly as the source", elem_id="mask-paste",
                                       info="the edit is pasted into the source frame by frame, so it follows a moving object closely")
            c.object_mask = gr.Checkbox(world == "shapes", label="or only around the moving object (bundled shapes clips know where it is, frame by frame)", elem_id="object-mask")
        with gr.Column(scale=2):
            c.box_preview = gr.Image(label="first | last frame: the box may change, the dimmed rest is kept; click two corners on a frame to draw its box",
                                     interactive=False, elem_id="mask-preview")
            c.corner = gr.State(None)  # the first corner of a box being drawn: [frame, x, y]
    with gr.Row():
        c.run = gr.Button("Render all prompts", variant="primary", elem_id="render-button")
        c.cancel = gr.Button("Cancel", elem_id="cancel-render")
    with gr.Row():
        c.earlier = gr.Dropdown([], multiselect=True, label="earlier edits of this inversion (play again, no recomputing)", elem_id="earlier", scale=3)
        c.play = gr.Button("Play selected")

    @gr.render(inputs=c.shown)
    def results(edits: list[EditRecord]) -> None:
        if not edits:
            gr.Markdown("Rendered edits play here, each beside its source (one video: the two halves play in step).")
            return
        with gr.Row(elem_id="results"):
            for r in edits:
                with gr.Column(min_width=300):
                    gr.Video(str(r.side_by_side), label=f"source | {r.prompt}", interactive=False, loop=True, autoplay=True, elem_classes="edit-result")
                    gr.Markdown(edit_label(r))
                    gr.DownloadButton("download this edit (mp4)", value=str(r.video), size="sm")

    return c


def _inversions_tab(act: Actions, tabs: gr.Tabs, pick: gr.Dropdown) -> SimpleNamespace:
    c = SimpleNamespace(total=gr.Markdown(elem_id="cache-total"))
    with gr.Row():
        c.max_size = gr.Textbox("10GB", label="gc: shrink the cache to (least recently used go first)", scale=3)
        c.gc = gr.Button("Run gc")
        c.refresh = gr.Button("Refresh")
    c.listed = gr.State([])

    @gr.render(inputs=c.listed)
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
                open_b.click(lambda i=v["id"]: (gr.Tabs(selected="edit"), act.inversion_choices(i)), None, [tabs, pick])
                delete_b.click(lambda: gr.update(visible=True), None, really_b)
                really_b.click(lambda i=v["id"]: act.delete(i), None, [c.listed, c.total, pick])

    return c


def build(cfg: AppConfig) -> gr.Blocks:
    act = Actions(cfg)
    with gr.Blocks(title="cogedit", analytics_enabled=False) as app:
        about = f" — the shipped {cfg.world} proxy, a 7M-parameter model for trying the app on a CPU, not CogVideoX-5B" if cfg.world else ""
        gr.Markdown(f"## cogedit — invert once, edit many times\nmodel `{Path(cfg.model).name}`{about} · on {act.runner.device} · cache `{cfg.folders.cache}`")
        chosen = gr.BrowserState(None, storage_key="cogedit-inversion")  # the Edit tab's inversion, kept over a reload
        with gr.Tabs() as tabs:
            with gr.Tab("Invert", id="invert"):
                inv = _invert_tab(cfg.invert_defaults, cfg.world)
            with gr.Tab("Edit", id="edit"):
                ed = _edit_tab(cfg.prompts, cfg.examples, cfg.world)
            with gr.Tab("Inversions", id="inversions") as inversions_tab:
                gal = _inversions_tab(act, tabs, ed.pick)

        # One GPU job at a time across the invert and the render: one concurrency group.
        gpu = dict(concurrency_id="gpu", concurrency_limit=1)
        inv.upload.upload(act.on_upload, inv.upload, [inv.source, inv.preview, inv.source_info])
        inv.upload.clear(lambda: (None, None, ""), None, [inv.source, inv.preview, inv.source_info])
        inv.clip.change(act.on_clip, inv.clip, [inv.source, inv.preview, inv.source_info, inv.source_prompt])
        for changed in (inv.source, inv.every):  # the windows and predicted time of every frame, while it is ticked
            changed.change(act.on_every, [inv.source, inv.every], inv.every_info)
        invert_inputs = [inv.source, inv.source_prompt, inv.frames, inv.height, inv.width, inv.fit, inv.steps, inv.plan, inv.method, inv.guidance, inv.verify, inv.attention, inv.every]
        inv.run.click(act.do_invert, invert_inputs, [inv.card, inv.strip, ed.pick, inv.to_edit], **gpu)
        inv.to_edit.click(lambda: gr.Tabs(selected="edit"), None, tabs)
        render_inputs = [ed.pick, ed.prompts, ed.inject_steps, ed.inject_layers, ed.strength, ed.guidance, ed.negative, ed.negative_source, ed.init, ed.seed, ed.reference, ed.mask_box, ed.attention,
                         ed.object_mask, ed.mask_box_end, ed.mask_fit, ed.mask_paste]
        ed.run.click(act.do_render, render_inputs, [ed.shown, ed.earlier, ed.pick_info], **gpu)
        for cancel in (inv.cancel, ed.cancel):
            cancel.click(act.do_cancel, None, None, queue=False)
        ed.pick.change(act.on_pick, ed.pick, [ed.pick_info, ed.earlier, ed.shown])
        ed.pick.change(lambda i: i, ed.pick, chosen)
        ed.play.click(act.show_earlier, [ed.pick, ed.earlier], ed.shown)
        # The preview follows the box as it is typed (.change: .input does not fire when the box is emptied).
        for changed in (ed.mask_box.change, ed.mask_box_end.change, ed.pick.change):
            changed(act.on_box, [ed.pick, ed.mask_box, ed.mask_box_end], [ed.box_preview, ed.box_hint], trigger_mode="always_last", show_progress="hidden")
        # "multiple": the second corner's click must not be dropped while the first is being handled
        ed.box_preview.select(act.on_draw, [ed.pick, ed.corner], [ed.mask_box, ed.mask_box_end, ed.corner], trigger_mode="multiple", show_progress="hidden")

        app.load(act.gallery_view, None, [gal.listed, gal.total]).then(act.inversion_choices, chosen, ed.pick)
        if cfg.invert_defaults["clip"]:  # the clip chosen in the list is the source from the start
            app.load(act.on_clip, inv.clip, [inv.source, inv.preview, inv.source_info, inv.source_prompt])
        inversions_tab.select(act.gallery_view, None, [gal.listed, gal.total])
        gal.refresh.click(act.gallery_view, None, [gal.listed, gal.total])
        gal.gc.click(act.run_gc, gal.max_size, [gal.listed, gal.total, ed.pick])
    return app
