"""Errors the model layer raises; callers map them to CLI messages or HTTP statuses."""


class WeightsNotFoundError(RuntimeError):
    """Backbone weights are not on disk and downloading is not allowed (or failed)."""


class WeightsFormatError(RuntimeError):
    """A backbone weight file exists but cannot be loaded (wrong format or architecture)."""


class CheckpointError(ValueError):
    """A prompt checkpoint is malformed or was trained for a different backbone setting."""


class UnknownDetectorError(ValueError):
    """The configuration names a detector that does not exist."""


# Everything that means "the configured detector cannot be built": callers report these
# as a configuration problem (CLI exit 2, service refuses to start), not as a crash.
DETECTOR_LOAD_ERRORS = (WeightsNotFoundError, WeightsFormatError, CheckpointError, UnknownDetectorError)
