"""The two DDIM schedulers, both built from the model's own scheduler config so that inversion
and edit walk the same noise levels: edit step i runs at the timestep inversion step
steps-1-i ran at."""

from __future__ import annotations

from typing import Any


def inverse_scheduler(scheduler_config: dict[str, Any], steps: int):
    from diffusers import DDIMInverseScheduler

    scheduler = DDIMInverseScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler


def edit_scheduler(scheduler_config: dict[str, Any], steps: int):
    from diffusers import CogVideoXDDIMScheduler

    scheduler = CogVideoXDDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler


def edit_timesteps(scheduler_config: dict[str, Any], steps: int, which: range | list[int]) -> set[int]:
    """The timesteps of the given edit steps."""
    timesteps = edit_scheduler(scheduler_config, steps).timesteps
    return {int(timesteps[i]) for i in which}
