"""Errors the model layer raises; callers map them to CLI messages or HTTP statuses."""


class WeightsNotFoundError(RuntimeError):
    """Backbone weights are not on disk and downloading is not allowed (or failed)."""


class WeightsFormatError(RuntimeError):
    """A backbone weight file exists but cannot be loaded (wrong format or architecture)."""


class CheckpointError(ValueError):
    """A prompt checkpoint is malformed or was trained for a different backbone setting."""


class DetectorConfigError(ValueError):
    """A detector config (a sidecar's ``detector_config``, training options) does not describe
    the detector's config dataclass: unknown, missing or wrongly typed keys."""


class ResumeError(ValueError):
    """A training resume state cannot be used: damaged, or written by a different run."""


class UnknownDetectorError(ValueError):
    """The configuration names a detector that does not exist."""


class VisionRuntimeError(RuntimeError):
    """The configured vision runtime (OpenVINO) cannot be set up."""


class RuntimeNotInstalledError(VisionRuntimeError):
    """The runtime's optional packages (``genclip-inspect[openvino]``) are not installed."""


class RuntimeExportError(VisionRuntimeError):
    """Exporting or quantizing the vision tower failed, or its result cannot be stored."""


class CalibrationDataError(VisionRuntimeError):
    """The images named for int8 calibration are missing or unreadable."""


# Everything that means "the configured detector cannot be built": callers report these
# as a configuration problem (CLI exit 2, service refuses to start), not as a crash.
DETECTOR_LOAD_ERRORS = (
    WeightsNotFoundError, WeightsFormatError, CheckpointError, UnknownDetectorError, VisionRuntimeError
)
