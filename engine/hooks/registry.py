"""Named, removable model hooks in diffusers' hook registry, and a context to apply them for a while.

cogedit composes its features onto diffusers modules the way diffusers' own hooks do (a config
dataclass, an `apply_x(module, config)`, a named hook class): injection, row groups, FF chunking
and K/V capture. These helpers are the registry calls they share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from engine.hooks.libraries import import_model_libraries

import_model_libraries()  # before diffusers.hooks: diffusers must see torchao hidden (engine.hooks.libraries)

from diffusers.hooks import HookRegistry, ModelHook  # noqa: E402

__all__ = ["ModelHook", "applied", "find", "register", "remove"]


def register(module: torch.nn.Module, hook: Any, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def remove(module: torch.nn.Module, name: str) -> None:
    """Remove hook `name` from `module` and every module below it."""
    HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=True)


def find(module: torch.nn.Module, name: str) -> Any:
    """Hook `name` on `module` itself, or None."""
    registry = getattr(module, "_diffusers_hook", None)
    return registry.get_hook(name) if registry is not None else None


@contextlib.contextmanager
def applied(module: torch.nn.Module, apply: Callable[[torch.nn.Module, Any], None], config: Any, undo: Callable[[torch.nn.Module], None]) -> Iterator[None]:
    """`apply(module, config)` for the duration of the context, `undo(module)` on exit."""
    apply(module, config)
    try:
        yield
    finally:
        undo(module)
