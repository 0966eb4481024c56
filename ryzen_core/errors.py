"""Errors a user can cause. The CLI prints their message on one line and exits with `exit_code`."""
from contextlib import contextmanager


class RyzenError(Exception):
    """A problem the user can fix; never shown with a traceback."""

    exit_code = 1


class ConfigError(RyzenError):
    exit_code = 2


class PluginError(RyzenError):
    exit_code = 2


class CheckpointError(RyzenError):
    exit_code = 1


class TrainingError(RyzenError):
    exit_code = 1


class WriteError(RyzenError):
    """A file could not be written (disk full, permissions); the message names the path and the cause."""

    exit_code = 1


@contextmanager
def writing(path):
    """Turn an OSError raised while writing under `path` into a WriteError naming the file and the cause."""
    try:
        yield
    except OSError as exc:
        raise WriteError(f"cannot write {exc.filename or path}: {exc.strerror or exc}") from None
