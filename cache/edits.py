"""Edits rendered into the cache beside their inversion, so that they play again without being
recomputed and leave with the inversion when it is removed (`cogedit ui` renders here).

    inversions/<id>/edits/
    ├── <stem>.mp4                  the edit (<stem>: engine.workflow.edit_stem + the prompt's name)
    ├── <stem>-side-by-side.mp4     source | edit
    └── <stem>.json                 its record: prompt, settings, the two file names, when

The record is written last and atomically: an edit is listed only once both videos are in place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.atomic import write_json_atomic
from cache.layout import EntryPaths
from cache.manifest import utc_now


@dataclass(frozen=True)
class EditRecord:
    """One rendered edit of an inversion."""

    prompt: str
    settings: dict[str, Any] = field(hash=False)  # the edit options it was rendered with
    video: Path
    side_by_side: Path
    created: str


def record_edit(paths: EntryPaths, video: Path, side_by_side: Path, prompt: str, settings: dict[str, Any]) -> EditRecord:
    """Record an edit whose two videos are already in `paths.edits_dir`."""
    for f in (video, side_by_side):
        if Path(f).parent.resolve() != paths.edits_dir.resolve():
            raise ValueError(f"{f} is not in {paths.edits_dir}: only edits rendered into the cache are recorded")
    record = {"prompt": prompt, "settings": settings, "video": Path(video).name, "side_by_side": Path(side_by_side).name, "created": utc_now()}
    write_json_atomic(paths.edits_dir / f"{Path(video).stem}.json", record)
    return _record(paths, record)


def _record(paths: EntryPaths, data: dict[str, Any]) -> EditRecord:
    return EditRecord(data["prompt"], data["settings"], paths.edits_dir / data["video"], paths.edits_dir / data["side_by_side"], str(data["created"]))


def list_edits(paths: EntryPaths) -> list[EditRecord]:
    """The inversion's recorded edits, newest first. A record that is unreadable, names a file
    outside the folder, or whose videos are gone is skipped: a listing never fails on one edit."""
    records = []
    for f in sorted(paths.edits_dir.glob("*.json")):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            names = (data["video"], data["side_by_side"])
            if not all(isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..") for n in names):
                continue
            record = _record(paths, data)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if record.video.is_file() and record.side_by_side.is_file():
            records.append(record)
    return sorted(records, key=lambda r: r.created, reverse=True)  # ISO times in UTC sort as text
