"""Frozen settings for each stage. Everything here that changes a result goes into a cache key."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import SettingsError


@dataclass(frozen=True)
class InvertSettings:
    """How a video's latents are walked back to noise."""

    steps: int = 50
    source_prompt: str = ""
    negative_prompt: str = ""
    guidance: float = 6.0

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= 1000:
            raise SettingsError(f"--steps must be between 1 and 1000, got {self.steps}")
        if self.guidance < 1.0:
            raise SettingsError(f"--guidance must be >= 1 (1 turns guidance off), got {self.guidance}")

    @property
    def uses_cfg(self) -> bool:
        # u + w(c - u) = u when c = u: with equal prompts guidance changes nothing, so skip the row.
        return self.guidance > 1.0 and self.source_prompt != self.negative_prompt

    def key_fields(self) -> dict:
        """What changes the trajectory; guidance only counts when it is in effect."""
        return {
            "steps": self.steps,
            "source_prompt": self.source_prompt,
            "negative_prompt": self.negative_prompt if self.uses_cfg else self.source_prompt,
            "guidance": self.guidance if self.uses_cfg else 1.0,
        }


def parse_window(text: str) -> tuple[float, float]:
    """'0:0.6' -> (0.0, 0.6): the fraction of edit steps that inject, from the noisy end."""
    try:
        start, end = (float(x) for x in text.split(":"))
    except ValueError:
        raise SettingsError(f"--inject-steps takes START:END fractions like 0:0.6, got {text!r}") from None
    if not 0.0 <= start <= end <= 1.0:
        raise SettingsError(f"--inject-steps needs 0 <= START <= END <= 1, got {text!r}")
    return start, end


def parse_layers(text: str, num_layers: int | None = None) -> tuple[int, ...] | None:
    """'all' -> None; '0-9,20' -> (0..9, 20)."""
    if text.strip().lower() == "all":
        return None
    layers: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            layers.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise SettingsError(f"--inject-layers takes 'all' or a list like 0-9,20, got {text!r}") from None
    if num_layers is not None and any(not 0 <= i < num_layers for i in layers):
        raise SettingsError(f"--inject-layers {text!r} names a layer outside 0-{num_layers - 1}")
    return tuple(sorted(layers))


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
        start, end = self.window
        return range(round(start * steps), round(end * steps))

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

    def __post_init__(self) -> None:
        from engine.errors import PromptError

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
