"""Errors a user can cause. The CLI prints them as one line, without a traceback, and exits 2."""


class LeansegError(Exception):
    """Base class: the message names the file or key at fault and how to fix it."""


class ConfigError(LeansegError):
    """An unknown key, a wrong type or a bad value in a config or on the command line."""


class DataError(LeansegError):
    """A missing dataset directory, a corrupt image, a mask of the wrong size or bad labels."""


class CheckpointError(LeansegError):
    """A missing, corrupt or incompatible checkpoint file."""
