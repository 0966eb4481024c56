"""Errors a user can cause. The CLI prints their message on one line and exits with `exit_code`."""


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
