"""User-facing errors: one line naming the cause and the fix.

The CLI prints ``error: <message>`` for these and exits with code 2; anything
else is a bug and keeps its traceback.
"""


class StarflowError(Exception):
    """Base class of errors caused by user input (files, shapes, options)."""


class ConfigError(StarflowError, ValueError):
    """The model config cannot be parsed or is inconsistent."""


class CheckpointError(StarflowError, ValueError):
    """A checkpoint cannot be read, or does not match the config."""


class InputError(StarflowError, ValueError):
    """Tensors passed to the model or the runtime have the wrong shape/dtype/values."""


class ManifestError(StarflowError, ValueError):
    """An export/engine directory is missing, incomplete or was edited after export."""


class BackendUnavailable(StarflowError, RuntimeError):
    """A requested backend (TensorRT, CUDA, ...) is not installed or has no device here."""


class GenerationCancelled(StarflowError, RuntimeError):
    """The caller's ``should_stop()`` asked a running generation to stop."""
