"""Errors the model layer raises; callers map them to CLI messages or HTTP statuses."""


class WeightsNotFoundError(RuntimeError):
    """Backbone weights are not on disk and downloading is not allowed (or failed)."""


class WeightsFormatError(RuntimeError):
    """A backbone weight file exists but cannot be loaded (wrong format or architecture)."""


class CheckpointError(ValueError):
    """A prompt checkpoint is malformed or was trained for a different backbone setting."""


class UnknownDetectorError(ValueError):
    """The configuration names a detector that does not exist."""
