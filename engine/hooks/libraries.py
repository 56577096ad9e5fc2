"""diffusers, transformers and torchao, imported on our terms.

diffusers and transformers import torchao at import time whenever it is installed (the test
extra installs it), and torchao then logs a dozen lines about native extensions and triton, and
torch a deprecation about torchao's enums: nothing a user can act on. cogedit calls torchao
itself, and only for --fp8, so the model libraries are imported with torchao hidden (they
record it as absent), and torchao, when --fp8 asks for it, is imported with those loggers quiet.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Iterator
from types import ModuleType

# Loggers whose warnings only ever say something a user cannot act on.
_NOISY_LOGGERS = (
    "torchao",  # "Failed to load .../_C_mxfp8...so", "Detected no triton"
    "torch.utils._pytree",  # torchao's enums registered the deprecated way
    "diffusers.quantizers.torchao.torchao_quantizer",  # "Unable to import `torchao` Tensor objects"
    # With the quant extra on a CPU, bitsandbytes asks the hub's `kernels` for a 4-bit CPU kernel at
    # import: offline that is two warnings ("Skipping publisher trust check", "Failed to load CPU
    # gemm_4bit_forward"), and bitsandbytes falls back to its own code either way.
    "kernels",
    "bitsandbytes.backends.cpu.ops",
)


def _quiet_loggers() -> None:
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def _hidden(package: str) -> Iterator[None]:
    """Inside the block, `package` reads as not installed, unless it is imported already."""
    if package in sys.modules:
        yield
        return
    sys.modules[package] = None  # type: ignore[assignment]  # import machinery: None means "not importable"
    try:
        yield
    finally:
        if sys.modules.get(package, ModuleType(package)) is None:
            del sys.modules[package]


@functools.cache
def import_model_libraries() -> None:
    """Import diffusers and transformers once, with torchao hidden from them and their
    per-shard progress bars off (our own bars show each phase)."""
    _quiet_loggers()
    with _hidden("torchao"):
        import diffusers.models.modeling_utils  # noqa: F401  # the imports that pull torchao in
        import transformers.modeling_utils  # noqa: F401
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def import_torchao() -> ModuleType:
    """torchao, for --fp8 (ImportError when it is not installed)."""
    _quiet_loggers()
    import torchao

    return torchao
