"""The errors normres reports to its users: each a ValueError whose message names the bad input.

The command line and the workflow's scripts print these as one line (no traceback); anything else is
a bug.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value that the study cannot run with."""


class DataError(ValueError):
    """A dataset, CSV or corrupted-set file that is missing, corrupt or not what was expected."""


class UnsafeFileError(ValueError):
    """A model or checkpoint file that cannot be loaded as plain tensors."""


class ModelFileError(ValueError):
    """A model file that is not a normres model, or not the one expected."""


class DeviceError(RuntimeError):
    """A GPU was allotted to the job but CUDA cannot use it (driver, capability, build)."""


USER_ERRORS = (ValueError, FileNotFoundError, DeviceError)
