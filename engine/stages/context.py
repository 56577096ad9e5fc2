"""What every stage gets besides its own settings: one small frozen context.

A stage is a plain function `x_stage(ctx, settings, inputs) -> outputs` in the module of its
kernel (encode, embed, inversion, editing, decode, attention_store, verify). The workflow builds
the context once per call and hands it down; data flows one way: video -> latents ->
trajectory -> edited latents -> mp4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cache.entry import InversionEntry
from cache.layout import CacheLayout
from engine.models.components import Runtime
from engine.models.model_info import ModelInfo

if TYPE_CHECKING:  # the reporter is handed down from above; stages only call its methods
    from engine.report import Reporter

Callback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class StageContext:
    info: ModelInfo
    runtime: Runtime
    layout: CacheLayout
    reporter: Reporter
    entry: InversionEntry | None = None  # the inversion being made or edited from
    callback: Callback | None = None  # gets {"phase", "i", "t", "x"} after every denoising step

    def notify(self, phase: str, state: dict[str, Any]) -> None:
        if self.callback is not None:
            self.callback({"phase": phase, **state})
