"""cogedit's engine: the Python API behind the `cogedit` command.

    import engine
    inv = engine.invert("clip.mp4", "THUDM/CogVideoX-5b")          # once; cached
    out = engine.edit(inv, ["a watercolor painting", "a charcoal sketch"])

Names are imported on first use, so that `import engine` (and a command such as `cogedit plan`)
does not pay for diffusers and the model code until they are needed.
"""

import importlib
import os

# Phases load and free multi-GB components in turn; expandable segments stop the freed blocks
# from fragmenting the next phase's memory (about 1 GiB measured). Only read before CUDA starts.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

_EXPORTS = {
    "CogeditError": "engine.errors",
    "ModelError": "engine.errors",
    "PromptError": "engine.errors",
    "SettingsError": "engine.errors",
    "VideoError": "engine.errors",
    "EditOptions": "engine.options",
    "InvertOptions": "engine.options",
    "Reporter": "engine.report",
    "Runtime": "engine.components",
    "alive": "engine.components",
    "inspect_model": "engine.model_info",
    "build_tiny_model": "engine.tiny",
    "write_proxy_model": "engine.proxy",
    "demo": "engine.demo",
    "EditResult": "engine.results",
    "Inversion": "engine.results",
    "open_inversion": "engine.results",
    "edit": "engine.workflow",
    "invert": "engine.workflow",
    "run": "engine.workflow",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once: later lookups skip this function
    return value
