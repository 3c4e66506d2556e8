"""Errors a user can cause and fix; entry points print their message on one line, no traceback."""


class MetasegError(Exception):
    """A problem with the user's input (config, data, checkpoint), with the fix in the message."""


class ConfigError(MetasegError):
    """A config value that cannot work; the message names the key."""


class DataError(MetasegError):
    """A dataset that cannot be read as declared; the message names the dataset and files."""


class CheckpointError(MetasegError):
    """A checkpoint that cannot be used; the message names the file."""
