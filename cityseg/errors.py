"""Errors that the CLI turns into a one-screen message and exit code 2 (never a traceback)."""


class CitysegError(Exception):
    """Base class of every user-facing error: bad config, bad data, bad command line."""


class ConfigError(CitysegError):
    """An experiment file or override is invalid; the message names the file and the dotted path."""


class DataError(CitysegError):
    """A dataset is missing or broken; the message names the path and what to do."""
