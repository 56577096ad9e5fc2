"""cogedit's engine: the Python API behind the `cogedit` command.

    import engine
    inv = engine.invert("clip.mp4", "THUDM/CogVideoX-5b")          # once; cached
    out = engine.edit(inv, ["a watercolor painting", "a charcoal sketch"])

Names are imported on first use, so that `import engine` (and a command such as `cogedit plan`)
does not pay for diffusers and the model code until they are needed.

Layout, by role (imports run down this list, never up; `errors` is the one leaf all may use):

    engine/jobs/       flows built on the public API: the demo, batches of jobs
    engine/            the public surface: workflow (invert, edit, run), options, results,
                       report, errors
    engine/stages/     the stages and their frozen settings
    engine/models/     model loading, memory plans, the shipped and tiny models
    engine/hooks/      features composed onto diffusers modules (injection, capture, ...)
    engine/video/      reading video; the bundled clips
    cache/             the on-disk cache (imports nothing of engine)
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
    "Runtime": "engine.models.components",
    "alive": "engine.models.components",
    "inspect_model": "engine.models.model_info",
    "build_tiny_model": "engine.models.tiny",
    "write_proxy_model": "engine.models.proxy",
    "demo": "engine.jobs.demo",
    "batch": "engine.jobs.batch",
    "BatchResult": "engine.jobs.batch",
    "shapes_demo": "engine.jobs.demo",
    "EditResult": "engine.results",
    "Inversion": "engine.results",
    "open_inversion": "engine.results",
    "edit": "engine.workflow",
    "every_frame": "engine.workflow",
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
