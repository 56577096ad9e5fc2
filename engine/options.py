"""The keyword options of `engine.invert`, `engine.edit` and `engine.run`, checked in one place.

The public functions take `**options` so that `run` can hand each one its own; an unknown or
misspelt keyword is refused before any work, with the known names in the message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from engine.errors import SettingsError


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how the models run; shared by invert and edit."""

    plan: str | None = None  # staged | lean | int8 | nf4 | offload
    vram: str | int | None = None  # pick the fastest plan predicted to fit (e.g. "12GB")
    compile: bool | None = None  # None: on where it pays (engine.models.components.compile_by_default)
    fp8: bool = False
    attention: str = "auto"  # auto | sdpa | fa4 | sage (engine.hooks.attention)
    device: str | None = None
    dtype: str | torch.dtype | None = None


@dataclass(frozen=True)
class InvertOptions(RuntimeOptions):
    """`engine.invert`'s options (the CLI flags of the same names)."""

    steps: int = 50
    frames: int | str | None = None  # None: the model's own (ModelInfo.defaults): 49 for 5B, 81 for 1.5; "all": every frame at `fps`
    fps: float | None = None  # read at this rate (default: the source's; the model's with frames="all")
    window_overlap: int | None = None  # latent frames neighbouring windows share (engine.stages.windows)
    skip_start: int = 0
    skip_end: int = 0
    stride: int | None = None
    height: int | None = None  # None: the model's own, 480x720 for 5B, 768x1360 for 1.5
    width: int | None = None
    fit: str = "stretch"  # stretch | crop | pad, when the source's shape is not the model's
    source_prompt: str = ""
    negative_prompt: str = ""
    guidance: float = 6.0
    inversion: str = "ddim"  # ddim | fixed-point
    inversion_iters: int | None = None  # fixed-point refinements per step (default 1)
    verify: bool = False  # round-trip the inverted noise and record the error
    attention_store: str = "none"  # none | cpu | disk
    attention_steps: str | tuple[float, float] = (0.0, 1.0)
    attention_layers: str | tuple[int, ...] | None = None
    attention_dtype: str = "model"
    attention_budget: int | None = None


@dataclass(frozen=True)
class EditOptions(RuntimeOptions):
    """`engine.edit`'s options (the CLI flags of the same names)."""

    negative_prompt: str = ""
    # The inversion's source prompt as the negative prompt: negative-prompt inversion (Miyake et al.
    # 2023) with an inversion made without CFG (guidance 1); the edit under the source prompt is
    # then the plain round trip, and guidance pushes only along what the prompt changes.
    negative_from_source: bool = False
    guidance: float = 6.0
    init: str = "inverted"  # inverted | random
    seed: int = 0
    inject_steps: str | tuple[float, float] = (0.0, 1.0)
    inject_layers: str | tuple[int, ...] | None = None
    inject_strength: float = 1.0
    reference: str = "shared"  # shared | per-half | stored
    batch: int = 4
    fps: float | None = None
    out_dir: str = "."
    force: bool = False
    model: str | None = None  # the model folder, if it moved since the inversion
    output: str = "mp4"  # mp4 | frames | latents
    skip_existing: bool = False  # mp4: render only the prompts whose files are not there yet
    gpus: int = 1  # 2, 4 or 8 processes (GPUs): guidance's halves, each splitting its tokens (engine.stages.distributed.Mesh)
    mask: Any = None  # local edit: an image or video path, a box (x0, y0, x1, y1) or an array (engine.video.masks)
    mask_box: str | tuple[float, float, float, float] | None = None  # "X0,Y0,X1,Y1" fractions of the frame
    mask_box_end: str | tuple[float, float, float, float] | None = None  # the box on the last frame: it moves from mask_box
    mask_fit: str = "none"  # none | object: shrink the mask to the object inside it (engine.video.masks.fit_to_object)
    mask_paste: bool = False  # the decoded edit put into the source through the mask, frame by frame (engine.video.masks.pasted)


def names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def parse(cls: type, options: dict[str, Any], call: str) -> Any:
    """`cls(**options)`, refusing unknown keywords with one line that lists the known ones."""
    unknown = sorted(set(options) - names(cls))
    if unknown:
        raise SettingsError(f"{call}() got unknown option(s) {', '.join(unknown)}; it takes {', '.join(sorted(names(cls)))}")
    return cls(**options)


def split_run_options(options: dict[str, Any]) -> tuple[InvertOptions, EditOptions]:
    """`engine.run`'s keywords, split between its invert and its edit: the runtime options go to
    both; `invert_guidance`/`invert_negative_prompt` name the inversion's own CFG settings and
    `invert_fps` the rate it reads at (the plain names belong to the edit, as on the `cogedit run`
    command line)."""
    renamed = {"invert_guidance": "guidance", "invert_negative_prompt": "negative_prompt", "invert_fps": "fps"}
    shared = names(RuntimeOptions)
    edit_names = names(EditOptions)
    invert_only = (names(InvertOptions) - edit_names) | set(renamed)
    unknown = sorted(set(options) - edit_names - invert_only)
    if unknown:
        known = sorted(edit_names | invert_only)
        raise SettingsError(f"run() got unknown option(s) {', '.join(unknown)}; it takes {', '.join(known)}")
    inv = {renamed.get(k, k): v for k, v in options.items() if k in invert_only or k in shared}
    edit = {k: v for k, v in options.items() if k in edit_names}
    return InvertOptions(**inv), EditOptions(**edit)
