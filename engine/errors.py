"""Typed engine errors. Each message names the problem and the fix; the CLI prints it on one line."""

from cache.errors import CacheError


class CogeditError(Exception):
    """Base class for every engine problem the user can act on."""


class VideoError(CogeditError):
    """The input video is missing, unreadable or has too few usable frames."""


class ModelError(CogeditError):
    """The model path is missing, incomplete, unreachable or an unsupported variant."""


class PromptError(CogeditError):
    """A prompt is missing or unusable."""


class SettingsError(CogeditError):
    """Two settings conflict or a value is out of range."""


class DeviceError(SettingsError):
    """--device names a device this torch cannot run on."""


class OutputExistsError(CogeditError):
    """An output file exists and --force was not given."""


class GPUOutOfMemoryError(CogeditError):
    """A phase ran out of GPU memory."""


class JobCancelled(CogeditError):
    """The user stopped a running job (the web app's Cancel); finished steps stay cached."""


class WorkerError(CogeditError):
    """A worker of a multi-process run (--nproc, --gpus 2) died; the others were stopped."""


# What the CLI turns into a one-line message instead of a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (CogeditError, CacheError)
