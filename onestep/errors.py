"""Errors a user can cause. The CLI prints them as one line on stderr and exits 2."""


class OnestepError(Exception):
    """Base class for every error that a user can fix (bad path, bad value, bad file)."""


class ConfigError(OnestepError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class StudentFormatError(OnestepError):
    """A folder is not a valid onestep student (or holds files we refuse to load)."""


class TeacherError(OnestepError):
    """A teacher cannot be found or loaded."""


class TrainingDiverged(OnestepError):
    """Training produced non-finite values it could not skip past (the message names the step and the
    last good checkpoint)."""
