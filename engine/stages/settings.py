"""Frozen settings of each stage. Everything here that changes a result goes into a cache key.

Frame selection (`engine.video.reader.FrameSettings`) lives with the code that selects frames; the
runtime (device, dtype, memory plan) is `engine.models.components.Runtime`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.errors import PromptError, SettingsError
from engine.stages.windows import Windowing, state_frames

INVERSIONS = ("ddim", "fixed-point")


def window_steps(window: tuple[float, float], steps: int) -> range:
    """The edit steps a START:END fraction covers, counted from the noisy end."""
    start, end = window
    return range(round(start * steps), round(end * steps))


def parse_window(text: str, flag: str = "--inject-steps") -> tuple[float, float]:
    """'0:0.6' -> (0.0, 0.6): the fraction of edit steps covered, from the noisy end."""
    try:
        start, end = (float(x) for x in text.split(":"))
    except ValueError:
        raise SettingsError(f"{flag} takes START:END fractions like 0:0.6, got {text!r}") from None
    if not 0.0 <= start <= end <= 1.0:
        raise SettingsError(f"{flag} needs 0 <= START <= END <= 1, got {text!r}")
    return start, end


def parse_layers(text: str, num_layers: int | None = None, flag: str = "--inject-layers") -> tuple[int, ...] | None:
    """'all' -> None; '0-9,20' -> (0..9, 20)."""
    if text.strip().lower() == "all":
        return None
    layers: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise SettingsError(f"{flag} takes 'all' or a list like 0-9,20, got {text!r}") from None
    if num_layers is not None and any(not 0 <= i < num_layers for i in layers):
        raise SettingsError(f"{flag} {text!r} names a layer outside 0-{num_layers - 1}")
    return tuple(sorted(layers))


def window_of(value: str | tuple[float, float], flag: str) -> tuple[float, float]:
    """A window given as text (CLI) or as a pair (Python)."""
    return parse_window(value, flag) if isinstance(value, str) else tuple(value)


def layers_of(value: str | tuple[int, ...] | None, num_layers: int, flag: str) -> tuple[int, ...] | None:
    """Layers given as text (CLI), as a tuple or None (Python)."""
    return parse_layers(value, num_layers, flag) if isinstance(value, str) else value


@dataclass(frozen=True)
class InvertSettings:
    """How a video's latents are walked back to noise."""

    steps: int = 50
    source_prompt: str = ""
    negative_prompt: str = ""
    guidance: float = 6.0
    method: str = "ddim"  # ddim | fixed-point (engine.stages.fixed_point)
    iters: int = 0  # fixed-point refinements per step
    # Clips longer than the model's window (engine.stages.windows): latent frames per transformer
    # call and the frames neighbours share; window 0 = the whole clip in one call (one window).
    window: int = 0
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.window:
            Windowing(self.window, self.overlap)  # checks the overlap
        if not 1 <= self.steps <= 1000:
            raise SettingsError(f"--steps must be between 1 and 1000, got {self.steps}")
        if self.guidance < 1.0:
            raise SettingsError(f"--guidance must be >= 1 (1 turns guidance off), got {self.guidance}")
        if self.method not in INVERSIONS:
            raise SettingsError(f"--inversion must be {' or '.join(INVERSIONS)}, got {self.method!r}")
        if self.method == "ddim" and self.iters:
            raise SettingsError("--inversion-iters refines fixed-point inversion: add --inversion fixed-point, or drop it")
        if self.method == "fixed-point" and not 1 <= self.iters <= 10:
            raise SettingsError(f"--inversion-iters must be between 1 and 10 with --inversion fixed-point, got {self.iters}")

    @property
    def uses_cfg(self) -> bool:
        # u + w(c - u) = u when c = u: with equal prompts guidance changes nothing, so skip the row.
        return self.guidance > 1.0 and self.source_prompt != self.negative_prompt

    def spans(self, frames: int) -> list[tuple[int, int]]:
        """The windows over a clip of `frames` latent frames."""
        return Windowing(self.window, self.overlap).spans(frames) if self.window else [(0, frames)]

    def key_fields(self) -> dict:
        """What changes the trajectory; guidance only counts when it is in effect."""
        fields = {
            "steps": self.steps,
            "source_prompt": self.source_prompt,
            "negative_prompt": self.negative_prompt if self.uses_cfg else self.source_prompt,
            "guidance": self.guidance if self.uses_cfg else 1.0,
        }
        if self.method != "ddim":  # plain DDIM keeps the ids it always had
            fields.update(method=self.method, iters=self.iters)
        if self.window:  # so do clips of one window; later windows start on an anchor (engine.stages.windows)
            fields.update(window=self.window, overlap=self.overlap, anchors="single-frame")
        return fields


def inverted_spans(entry, info) -> list[tuple[int, int]]:
    """The windows an inversion (`entry`, a cache entry of model `info`) ran over its clip's latent
    frames: an edit, a round trip or a capture from it blends the same windows. An entry whose
    latents lack the windows' anchors (made by an earlier cogedit) is refused with the fix."""
    spans = InvertSettings(**entry.manifest["settings"]["invert"]).spans(info.vae_latent_frames(entry.frames))
    shape = entry.manifest["summary"].get("latent_shape")
    if shape is not None and shape[1] != state_frames(spans):
        raise SettingsError(
            f"inversion {entry.id[:12]} was made by an earlier cogedit, whose windows started without anchors: "
            f"invert the clip again (`cogedit cache rm {entry.id[:12]}` frees its space)"
        )
    return spans


@dataclass(frozen=True)
class InjectSettings:
    """Which steps and blocks take the reference's keys/values, and how strongly."""

    window: tuple[float, float] = (0.0, 1.0)
    layers: tuple[int, ...] | None = None  # None = every block
    strength: float = 1.0  # log-bias on the reference logits: 0 = off, 1 = upstream
    reference: str = "shared"  # shared | per-half | stored

    def __post_init__(self) -> None:
        if self.strength < 0:
            raise SettingsError(f"--inject-strength must be >= 0, got {self.strength}")
        if self.reference not in ("shared", "per-half", "stored"):
            raise SettingsError(f"--reference must be shared, per-half or stored, got {self.reference!r}")

    def active_steps(self, steps: int) -> range:
        return window_steps(self.window, steps)

    def is_active(self, step: int, steps: int) -> bool:
        return self.strength > 0 and self.layers != () and step in self.active_steps(steps)


@dataclass(frozen=True)
class EditSettings:
    """How edits are rendered from an inversion."""

    prompts: tuple[str, ...]
    negative_prompt: str = ""
    guidance: float = 6.0
    init: str = "inverted"  # inverted | random
    seed: int = 0
    inject: InjectSettings = field(default_factory=InjectSettings)
    batch: int = 4  # prompts per transformer pass
    mask: str | None = None  # digest of the local-edit mask (engine.video.masks.Mask.digest); None = edit everywhere
    paste: bool = False  # the decoded edit put into the source through the mask (engine.video.masks.pasted)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise PromptError("no prompt given: pass --prompt TEXT (repeat it for several edits)")
        if any(not p.strip() for p in self.prompts):
            raise PromptError("an edit prompt is empty: describe the edited video, e.g. --prompt 'a watercolor painting'")
        if self.init not in ("inverted", "random"):
            raise SettingsError(f"--init must be inverted or random, got {self.init!r}")
        if self.guidance < 1.0:
            raise SettingsError(f"--guidance must be >= 1 (1 turns guidance off), got {self.guidance}")
        if self.batch < 1:
            raise SettingsError(f"--batch must be >= 1, got {self.batch}")

    @property
    def uses_cfg(self) -> bool:
        return self.guidance > 1.0

    def chunks(self) -> list[tuple[str, ...]]:
        """The prompts of each transformer pass."""
        return [self.prompts[i : i + self.batch] for i in range(0, len(self.prompts), self.batch)]

    def key_fields(self) -> dict:
        """Everything that changes the edited pixels except the prompts (they name the files).
        A setting with no effect takes its default value, so it leaves the hash (and the output
        names) as they were: the seed without --init random, the negative prompt without CFG,
        the injection window, layers and reference at strength 0."""
        inject = self.inject if self.inject.strength > 0 else InjectSettings(strength=0.0)
        fields = dataclasses.asdict(dataclasses.replace(
            self,
            seed=self.seed if self.init == "random" else 0,
            negative_prompt=self.negative_prompt if self.uses_cfg else "",
            inject=inject,
        ))
        del fields["prompts"], fields["batch"]  # batching does not change a row's result
        if self.mask is None:  # unmasked edits keep the names they always had
            del fields["mask"]
        if not self.paste or self.mask is None:  # nor do masked edits without --mask-paste
            del fields["paste"]
        return fields


@dataclass(frozen=True)
class StoreSettings:
    """Which timesteps and blocks of stored attention to capture, where, and in what precision."""

    where: str = "none"  # none | cpu | disk
    window: tuple[float, float] = (0.0, 1.0)  # in edit-step fractions, like --inject-steps
    layers: tuple[int, ...] | None = None
    dtype: str = "model"  # model (bf16 on GPU: exact replay) | bf16 | fp8

    def __post_init__(self) -> None:
        if self.where not in ("none", "cpu", "disk"):
            raise SettingsError(f"--attention-store must be none, cpu or disk, got {self.where!r}")
        if self.dtype not in ("model", "bf16", "fp8"):
            raise SettingsError(f"--attention-dtype must be model, bf16 or fp8, got {self.dtype!r}")

    @property
    def key(self) -> str:
        from cache.keys import stable_hash

        return stable_hash({"window": self.window, "layers": self.layers, "dtype": self.dtype}, length=16)

    def edit_steps(self, steps: int) -> range:
        return window_steps(self.window, steps)

    def block_ids(self, num_layers: int) -> tuple[int, ...]:
        return tuple(range(num_layers)) if self.layers is None else self.layers

    def bytes_needed(self, steps: int, num_layers: int, tokens: int, width: int, model_bytes: int = 2) -> int:
        per_tensor = tokens * width * {"fp8": 1, "bf16": 2}.get(self.dtype, model_bytes)
        return len(self.edit_steps(steps)) * len(self.block_ids(num_layers)) * 2 * per_tensor
