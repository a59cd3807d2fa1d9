"""Errors that the CLI turns into a one-screen message and exit code 2 (never a traceback)."""


class CitysegError(Exception):
    """Base class of every user-facing error: bad config, bad data, bad command line."""


class ConfigError(CitysegError):
    """An experiment file or override is invalid; the message names the file and the dotted path."""


class DataError(CitysegError):
    """A dataset is missing or broken; the message names the path and what to do."""


class StorageError(CitysegError):
    """A file or store could not be written (full disk, no permission); the message names the
    path and what was being written."""


class RankFailed(CitysegError):
    """Another rank failed (torchrun): its message, so rank 0 can record why the run stopped."""


class TrainingDiverged(Exception):
    """The training loss became NaN or infinite; the message names the epoch and step."""


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the command is (as Ctrl-C raises KeyboardInterrupt), so
    that what it was writing is removed on the way out; exit 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved."""

    def __init__(self, signum: int, run_id: str, where: str) -> None:
        super().__init__(f"interrupted by signal {signum} at {where}")
        self.signum, self.run_id, self.where = signum, run_id, where

    def __reduce__(self):  # crosses process boundaries (parallel sweep children)
        return (Interrupted, (self.signum, self.run_id, self.where))
