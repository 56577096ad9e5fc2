"""The cache as a gallery (what `cogedit ui` shows): each inversion with a strip of thumbnails,
its settings, its size on disk and its edits; edits rendered into the cache beside their
inversion, so that they play again without recomputing (`cache.edits` keeps their records)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache.atomic import write_bytes_atomic
from cache.edits import EditRecord, list_edits, record_edit
from cache.entry import InversionEntry
from cache.errors import CacheError, InvalidEntryIdError
from cache.layout import CacheLayout
from cache.store import entry_info, list_entries
from engine.report import Reporter
from engine.results import Inversion, open_inversion
from engine.video.masks import box_mask, parse_box
from engine.workflow import Prompts, edit

THUMBNAILS = 5  # frames in a strip
THUMB_HEIGHT = 72  # pixels


@dataclass(frozen=True)
class InversionCard:
    """One inversion as the gallery shows it."""

    id: str
    state: str  # complete | partial | broken (cache.store.EntryInfo.state)
    summary: dict[str, Any]  # video, model, steps, fps, frames
    settings: dict[str, Any]  # frames, invert and model settings as given ({} when broken)
    verify: dict[str, Any] | None  # the round trip's error, if checked
    size_bytes: int  # on disk, edits included
    last_used: str | None
    edits: list[EditRecord]
    thumbnails: Path | None  # None until the inversion is complete


def thumbnail_strip(inv: Inversion, count: int = THUMBNAILS, height: int = THUMB_HEIGHT) -> Path:
    """A PNG strip of `count` evenly spaced source frames, made once and kept in the entry."""
    from PIL import Image

    path = inv.paths.thumbnails
    if path.is_file():
        return path
    frames = inv.frames()  # uint8 [F, H, W, 3]
    n = frames.shape[0]
    picks = [round(i * (n - 1) / max(count - 1, 1)) for i in range(min(count, n))]
    width = max(1, round(frames.shape[2] * height / frames.shape[1]))
    tiles = [Image.fromarray(frames[i].numpy()).resize((width, height), Image.Resampling.BILINEAR) for i in picks]
    strip = Image.new("RGB", (width * len(tiles), height))
    for k, tile in enumerate(tiles):
        strip.paste(tile, (k * width, 0))
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
    return path


PREVIEW_GAP = 4  # px of white between the first and the last frame in box_preview
PREVIEW_HEIGHT = 192  # a preview of small frames is enlarged (nearest, by a whole factor) to about this height


def preview_scale(height: int) -> int:
    """The whole factor box_preview enlarges frames of `height` px by (1 for frames this tall or taller)."""
    return max(1, PREVIEW_HEIGHT // height)


def box_preview(inv: Inversion, box: str | tuple[float, float, float, float] | None, end: str | tuple[float, float, float, float] | None = None) -> np.ndarray:
    """The inversion's first and last source frames side by side (PREVIEW_GAP px apart), each with
    its local-edit box: `box` (`--mask-box`) on the first, `end` (`--mask-box-end`, else `box`) on the
    last; outside the box (what the edit keeps) dimmed, the box outlined; no box, nothing dimmed.
    Small frames are enlarged by `preview_scale` (a page shows the image at its own size or smaller,
    and maps clicks on it only so). uint8 [sH, 2sW + PREVIEW_GAP, 3]; a bad box is a SettingsError."""
    frames = inv.frames()
    first, last = frames[0].numpy(), frames[inv.entry.output_frames - 1].numpy()
    end = end if end is not None else box
    scale = preview_scale(first.shape[0])
    shown = [_boxed(first, box, "--mask-box"), _boxed(last, end, "--mask-box-end" if end is not box else "--mask-box")]
    big = [f.repeat(scale, 0).repeat(scale, 1) for f in shown]
    gap = np.full((big[0].shape[0], PREVIEW_GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([big[0], gap, big[1]], axis=1)


def preview_point(inv: Inversion, x: float, y: float) -> tuple[str, float, float]:
    """A point of box_preview's image (px) as ("first" or "last" frame, x and y in fractions of that frame, clipped to 0-1)."""
    h, w = inv.entry.frame_settings["height"], inv.entry.frame_settings["width"]
    scale = preview_scale(h)
    side, x = ("first", x) if x < scale * w else ("last", x - scale * w - PREVIEW_GAP)
    return side, min(max(x / (scale * w), 0.0), 1.0), min(max(y / (scale * h), 0.0), 1.0)


def _boxed(frame: np.ndarray, box: str | tuple[float, float, float, float] | None, flag: str) -> np.ndarray:
    if box is None:
        return frame
    h, w = frame.shape[:2]
    inside = box_mask(parse_box(box, flag), 1, h, w).pixels[0].numpy() > 0
    out = np.where(inside[..., None], frame, frame // 3).astype(np.uint8)
    rows, cols = np.nonzero(inside)
    if rows.size:  # the outline, 1 px, on the box's own pixels
        r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
        for edge in (out[r0, c0 : c1 + 1], out[r1, c0 : c1 + 1], out[r0 : r1 + 1, c0], out[r0 : r1 + 1, c1]):
            edge[:] = (255, 64, 64)
    return out


def _thumbnails(entry: InversionEntry, layout: CacheLayout) -> Path | None:
    try:
        return thumbnail_strip(Inversion(entry, layout))
    except CacheError:  # a read-only cache, or damaged frames: the card goes without
        return None


def card(layout: CacheLayout, inv_id: str) -> InversionCard:
    """One inversion's card; InvalidEntryIdError if it is not in the cache. Its manifest is read,
    not opened: looking at the gallery does not count as a use for gc."""
    info = entry_info(layout, inv_id)
    entry = InversionEntry.read(layout.entry(inv_id)) if info.complete else None  # a broken one stays a card
    thumbs = _thumbnails(entry, layout) if entry is not None else None
    if thumbs is not None:  # the strip may be new: the size counts it
        info = entry_info(layout, inv_id)
    settings, verify = (entry.manifest["settings"], entry.verify) if entry is not None else ({}, None)
    return InversionCard(info.id, info.state, info.summary, settings, verify, info.size_bytes, info.last_used, list_edits(layout.entry(inv_id)), thumbs)


def inversions(cache_dir: str | Path | None = None) -> list[InversionCard]:
    """Every inversion in the cache, most recently used first, unfinished and broken ones too."""
    layout = CacheLayout.from_dir(cache_dir)
    cards = []
    for info in list_entries(layout):
        try:
            cards.append(card(layout, info.id))
        except InvalidEntryIdError:  # removed since the listing (another process's delete or gc)
            continue
    return cards


def render_edits(inversion: Inversion | str, prompts: Prompts, *, cache_dir: str | Path | None = None, reporter: Reporter | None = None, **options: Any) -> list[EditRecord]:
    """One edit per prompt, rendered into the cache beside the inversion and recorded with the
    options given (`engine.EditOptions` but out_dir and force, as JSON values). A prompt already
    rendered with the same options is not rendered again: its recorded edit is returned."""
    inv = open_inversion(inversion, cache_dir) if isinstance(inversion, str) else inversion
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    done: dict[str, EditRecord] = {}
    for r in list_edits(inv.paths):  # newest first
        if r.settings == options:
            done.setdefault(r.prompt, r)
    todo = [p for p in dict.fromkeys(prompts) if p not in done]
    if todo:
        # force: files of an edit whose record was lost are overwritten with the same pixels.
        result = edit(inv, todo, cache_dir=cache_dir, reporter=reporter, out_dir=str(inv.paths.edits_dir), force=True, **options)
        for p, v, s in zip(result.prompts, result.videos, result.side_by_side):
            done[p] = record_edit(inv.paths, v, s, p, options)
    return [done[p] for p in prompts]
