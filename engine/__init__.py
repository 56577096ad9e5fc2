"""cogedit's engine: the Python API behind the `cogedit` command.

    import engine
    inv = engine.invert("clip.mp4", "THUDM/CogVideoX-5b")          # once; cached
    out = engine.edit(inv, ["a watercolor painting", "a charcoal sketch"])
"""

import os

# Phases load and free multi-GB components in turn; expandable segments stop the freed blocks
# from fragmenting the next phase's memory (about 1 GiB measured). Only read before CUDA starts.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from engine.components import Runtime, alive, inspect_model
from engine.demo import demo
from engine.errors import CogeditError, ModelError, PromptError, SettingsError, VideoError
from engine.report import Reporter
from engine.proxy import write_proxy_model
from engine.tiny import build_tiny_model
from engine.workflow import EditResult, Inversion, edit, invert, open_inversion, run

__all__ = [
    "CogeditError",
    "EditResult",
    "Inversion",
    "ModelError",
    "PromptError",
    "Reporter",
    "Runtime",
    "SettingsError",
    "VideoError",
    "alive",
    "build_tiny_model",
    "demo",
    "edit",
    "inspect_model",
    "invert",
    "open_inversion",
    "run",
    "write_proxy_model",
]
