"""What the page's buttons do: each handler turns widget values into keyword options and makes
one engine or cache call; the page itself is `webui.app`."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

import engine
from cache.edits import EditRecord, list_edits
from cache.errors import InvalidEntryIdError
from cache.layout import CacheLayout
from cache.sizes import format_size, parse_size
from cache.store import gc, list_entries, loose_size, remove_entry
from engine.errors import SettingsError
from engine.jobs.demo import DEMO_PROMPTS, DEMO_SETTINGS, SHAPES_SEED, demo_model
from engine.jobs.gallery import InversionCard, box_preview, card, inversions, preview_point, render_edits
from engine.models.components import Runtime
from engine.models.model_info import ModelInfo, inspect_model
from engine.models.proxy import example_prompts
from engine.options import InvertOptions
from engine.stages.verify import verdict
from engine.video import shapes
from engine.video.masks import box_text
from engine.video.reader import probe_video
from webui.folders import Folders, bundled_names
from webui.jobs import JobRunner, one_line, page_words


@dataclass(frozen=True)
class AppConfig:
    model: str  # folder or hub id
    folders: Folders
    invert_defaults: dict[str, Any]  # steps, frames, height, width, source_prompt, verify
    prompts: tuple[str, ...]  # the edit prompts the page starts with
    world: str = "shapes"  # the proxy's world: its bundled clips come first; "" for a model given
    examples: tuple[str, ...] = ()  # prompts the model can follow (a proxy knows only its captions)


def app_config(model: str | None, folders: Folders, world: str = "shapes") -> AppConfig:
    """With no model, the shipped proxy of `world` at its own size (a CPU renders an edit in about
    a minute), starting on its first bundled clip, verified; a model given is checked now, so that
    a wrong path fails before the page opens, and the page's frames and size start at the model's
    own (81 at 768x1360 for CogVideoX1.5-5B)."""
    if model is None:
        clip = bundled_names(world)[0]
        caption = folders.bundled_clip(clip)[1]
        prompts = tuple(shapes.with_change(shapes.clip_spec(SHAPES_SEED, "heldout"), color=c).caption for c in ("red", "green")) if world == "shapes" else DEMO_PROMPTS
        defaults = dict(DEMO_SETTINGS, source_prompt=caption, verify=True, clip=clip)
        return AppConfig(str(demo_model(folders.cache, world)), folders, defaults, prompts, world, example_prompts(world))
    own = inspect_model(model).defaults
    d = InvertOptions()
    return AppConfig(str(model), folders, dict(steps=d.steps, frames=own.frames, height=own.height, width=own.width, source_prompt=d.source_prompt, verify=d.verify, clip=None), (), "")


def _with_errors(outputs: int):
    """For the quick handlers (no job): a failure is a one-line notice in the page's words, never
    a traceback, and leaves the handler's `outputs` as they were (gr.Error would mark them failed)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapped(self: Actions, *args: Any) -> Any:
            try:
                return fn(self, *args)
            except Exception as exc:
                self.runner.notify("Error", one_line(exc))
                return gr.skip() if outputs == 1 else tuple(gr.skip() for _ in range(outputs))

        return wrapped

    return decorate


def _number(value: float | None, name: str) -> float:
    if value is None:
        raise SettingsError(f"{name} is empty: enter a number")
    return float(value)


def inversion_md(card: InversionCard) -> str:
    s, inv = card.summary, card.settings.get("invert", {})
    fr = card.settings.get("frames", {})
    lines = [
        f"**{card.id[:12]}** · {s.get('video', '?')} · {card.state} · {format_size(card.size_bytes)} on disk",
        f"{s.get('frames', fr.get('max_frames', '?'))} frames at {fr.get('height', '?')}x{fr.get('width', '?')} ({fr.get('fit', '?')}), "
        f"{inv.get('steps', '?')} steps {inv.get('method', '')}, source prompt: “{inv.get('source_prompt', '')}”",
        f"model: {Path(str(s.get('model', '?'))).name} · {len(card.edits)} edit(s)",
    ]
    if s.get("windows"):
        lines[1] += f", {len(s['windows'])} overlapping windows"
    if card.verify:
        v = card.verify
        lines.append(f"round trip (verify): **{verdict(v['latent_rel_error'])}**, latent error {v['latent_rel_error']:.3g}, PSNR {v['psnr_db']:.1f} dB")
    return "  \n".join(lines)


def edit_label(r: EditRecord) -> str:
    o = r.settings
    local = f", box {o['mask_box']}" if o.get("mask_box") else ", around the object" if o.get("mask") else ""
    local += f" to {o['mask_box_end']}" if o.get("mask_box_end") else ""
    local += ", fit to the object" if o.get("mask_fit") == "object" else ""
    local += ", pasted into the source" if o.get("mask_paste") else ""
    negative = ", negative: the source prompt" if o.get("negative_from_source") else f", negative '{o['negative_prompt']}'" if o.get("negative_prompt") else ""
    return f"{r.prompt} · window {o.get('inject_steps')}, strength {o.get('inject_strength')}, guidance {o.get('guidance')}{negative}{local} · {r.created[:16].replace('T', ' ')}"


class Actions:
    """The handlers, bound to one app's model, folders and job runner."""

    def __init__(self, cfg: AppConfig) -> None:
        self.cfg, self.folders = cfg, cfg.folders
        self.layout = CacheLayout(cfg.folders.cache)
        self.runner = JobRunner(Runtime.default().device, (cfg.folders.uploads, cfg.folders.cache))

    @functools.cached_property
    def model_info(self) -> ModelInfo:
        return inspect_model(self.cfg.model)

    @_with_errors(1)
    def on_every(self, source: str | None, every: bool) -> str:
        """With "every frame" ticked and a clip chosen: its frames at the model's rate, their windows and the predicted time."""
        if not every or not source:
            return ""
        frames, windows = engine.every_frame(probe_video(self.folders.check(source)), self.model_info)
        fps = f"{self.model_info.defaults.fps:g} fps"
        if windows < 2:
            return f"every frame at {fps}: {frames} frames, one window"
        return f"every frame at {fps}: {frames} frames in {windows} overlapping windows, predicted {windows}x one window's time"

    def cards(self) -> list[InversionCard]:
        return inversions(self.folders.cache)

    def card(self, inv_id: str) -> InversionCard:
        """One inversion's card, without building the whole gallery; InvalidEntryIdError if it is gone."""
        return card(self.layout, inv_id)

    def inversion_choices(self, chosen: str | None = None) -> Any:
        # The listing alone: the full cards (thumbnails, edits, manifests read again) are not needed here.
        done = [e for e in list_entries(self.layout) if e.complete]
        choices = [(f"{e.id[:12]} · {e.summary.get('video', '?')} · {e.summary.get('steps', '?')} steps", e.id) for e in done]
        return gr.update(choices=choices, value=chosen if chosen in {c.id for c in done} else None)

    # ------------------------------------------------------------------ source clip
    @_with_errors(3)
    def on_upload(self, file: str | None) -> tuple:
        if not file:
            return None, None, ""
        path = self.folders.check(file)
        info = probe_video(path)
        return str(path), str(path), f"{path.name}: {info.num_frames} frames, {info.width}x{info.height}, {info.fps:g} fps"

    @_with_errors(4)
    def on_clip(self, name: str | None) -> tuple:
        if not name:
            return gr.update(), gr.update(), gr.update(), gr.update()
        path, caption = self.folders.bundled_clip(name)
        info = probe_video(path)
        return str(path), str(path), f"bundled {name}: {info.num_frames} frames, {info.width}x{info.height}, {info.fps:g} fps", caption

    # ------------------------------------------------------------------ jobs
    def do_invert(self, source, source_prompt, frames, height, width, fit, steps, plan, method, guidance, verify, attention, every=False,
                  request: gr.Request = None, progress=gr.Progress()):  # noqa: B008
        """`every`: every frame at the model's rate, a long clip in overlapping windows (frames is then unused)."""

        def job(reporter):
            if not source:
                raise SettingsError("no clip yet: upload one, or pick a bundled clip")
            sizes = {name: int(_number(value, name)) for name, value in (("height", height), ("width", width), ("steps", steps))}
            sizes["frames"] = "all" if every else int(_number(frames, "frames"))
            opts = dict(**sizes, fit=fit, inversion=method, guidance=_number(guidance, "inversion guidance"), verify=bool(verify), source_prompt=source_prompt, attention=attention)
            return engine.invert(self.folders.check(source), self.cfg.model, cache_dir=self.folders.cache, reporter=reporter, plan=None if plan == "auto" else plan, **opts)

        inv, notes = self.runner.run(job, progress, request.session_hash)
        if inv is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        shown = self.card(inv.id)  # its strip is made here, with the card
        card_md = "  \n".join([inversion_md(shown), *(f"⚠ {n}" for n in notes)])
        return card_md, str(shown.thumbnails) if shown.thumbnails else None, self.inversion_choices(inv.id), gr.update(visible=True)

    def do_render(self, inv_id, prompts_text, inject_steps, inject_layers, strength, guidance, negative, negative_source, init, seed, reference, mask_box,
                  attention, object_mask=False, mask_box_end="", mask_fit="none", mask_paste=False, request: gr.Request = None, progress=gr.Progress()):  # noqa: B008
        prompts = [p.strip() for p in (prompts_text or "").splitlines() if p.strip()]

        def job(reporter):
            if not inv_id:
                raise SettingsError("no inversion chosen: invert a clip first, or open one from the Inversions tab")
            if not prompts:
                raise SettingsError("write at least one prompt, one per line")
            inv = engine.open_inversion(inv_id, self.folders.cache)
            options = dict(
                inject_steps=inject_steps, inject_layers=inject_layers, inject_strength=_number(strength, "injection strength"),
                guidance=_number(guidance, "guidance"), init=init, seed=int(_number(seed, "seed")), reference=reference,
            )
            # recorded only when set, as the box: earlier edits keep matching their records
            if negative_source:  # negative-prompt inversion: the engine takes the inversion's source prompt
                options["negative_from_source"] = True
            elif negative:
                options["negative_prompt"] = negative
            if (mask_box or "").strip():  # a local edit: only the box may change
                options["mask_box"] = mask_box.strip()
            if (mask_box_end or "").strip():  # the box on the last frame: it moves from the first frame's
                options["mask_box_end"] = mask_box_end.strip()
            if mask_fit != "none":
                options["mask_fit"] = mask_fit
            if mask_paste:
                options["mask_paste"] = True
            if object_mask:  # only around the moving object, which a bundled shapes clip knows frame by frame
                options["mask"] = str(self.folders.object_mask(inv.manifest["summary"].get("video", "")))
            if attention != "auto":
                options["attention"] = attention
            return inv.id, render_edits(inv, prompts, cache_dir=self.folders.cache, reporter=reporter, **options)

        done, _ = self.runner.run(job, progress, request.session_hash)
        if done is None:
            return gr.skip(), gr.skip(), gr.skip()
        inv_id, records = done
        return records, self.earlier_choices(inv_id), inversion_md(self.card(inv_id))

    def on_box(self, inv_id: str | None, box: str | None, end: str | None = None) -> tuple:
        """The first and last frames with the local-edit boxes drawn on them, and a line under them:
        what is wrong with a box while it is being typed (no notice: a half-typed box is not a mistake yet)."""
        if not inv_id:
            return None, ""
        try:
            return box_preview(engine.open_inversion(inv_id, self.folders.cache), (box or "").strip() or None, (end or "").strip() or None), ""
        except Exception as exc:
            return gr.skip(), page_words(one_line(exc), self.runner.folders)

    def on_draw(self, inv_id: str | None, corner: list | None, evt: gr.SelectData) -> tuple:
        """A click on the preview draws a box: the first click marks a corner, the second the opposite
        one; on the first frame it is the local-edit box, on the last frame the last frame's box.
        Returns the box, the last frame's box (each unchanged unless drawn) and the corner waiting."""
        if not inv_id:
            return gr.skip(), gr.skip(), None
        side, *point = preview_point(engine.open_inversion(inv_id, self.folders.cache), *evt.index)
        if not corner or corner[0] != side:  # a first corner (or one on the other frame: start again)
            return gr.skip(), gr.skip(), [side, *point]
        (x0, x1), (y0, y1) = sorted((corner[1], point[0])), sorted((corner[2], point[1]))
        box = box_text(x0, y0, x1, y1)
        return (box, gr.skip(), None) if side == "first" else (gr.skip(), box, None)

    def do_cancel(self, request: gr.Request) -> None:
        gr.Info(self.runner.cancel(request.session_hash))

    # ------------------------------------------------------------------ edits of one inversion
    def earlier_choices(self, inv_id: str | None) -> Any:
        edits = list_edits(self.layout.entry(inv_id)) if inv_id else []
        return gr.update(choices=[(edit_label(r), r.video.name) for r in edits], value=[])

    @_with_errors(3)
    def on_pick(self, inv_id: str | None) -> tuple:
        if not inv_id:
            return "", self.earlier_choices(None), []
        try:
            shown = self.card(inv_id)
        except InvalidEntryIdError:
            raise SettingsError(f"inversion {inv_id[:12]} is no longer in the cache; pick another") from None
        return inversion_md(shown), self.earlier_choices(inv_id), []

    @_with_errors(1)
    def show_earlier(self, inv_id: str | None, names: list[str]) -> list[EditRecord]:
        # Names from the browser only select among the recorded edits: none becomes a path.
        edits = list_edits(self.layout.entry(inv_id)) if inv_id else []
        return [r for r in edits if r.video.name in set(names or [])]

    # ------------------------------------------------------------------ the gallery
    def gallery_view(self) -> tuple:
        """The cards (plain data, for a gr.State) and the cache's total."""
        all_cards = self.cards()
        views = [{"id": c.id, "md": inversion_md(c), "thumbnails": str(c.thumbnails) if c.thumbnails else None} for c in all_cards]
        size = sum(c.size_bytes for c in all_cards) + loose_size(self.layout)  # cache.store.total_size without listing again
        total = f"{len(all_cards)} inversion(s); the cache holds {format_size(size)} in `{self.folders.cache}`"
        return views, total

    @_with_errors(3)
    def delete(self, inv_id: str) -> tuple:
        freed = remove_entry(self.layout, inv_id)
        gr.Info(f"removed {inv_id[:12]} ({format_size(freed)})")
        return (*self.gallery_view(), self.inversion_choices())

    @_with_errors(3)
    def run_gc(self, max_size: str) -> tuple:
        try:
            limit = parse_size(max_size)
        except ValueError as exc:
            raise SettingsError(f"gc size: {exc}") from None
        removed = gc(self.layout, limit)
        gr.Info(f"gc removed {len(removed)} item(s), {format_size(sum(r.size_bytes for r in removed))}")
        return (*self.gallery_view(), self.inversion_choices())
