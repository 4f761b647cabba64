"""Exceptions that carry a message a user can act on (what is wrong, and how to fix it)."""


class LocaldiffError(Exception):
    """Base class: the CLI prints these as one clear message instead of a traceback."""


class DataError(LocaldiffError, ValueError):
    """A data file or directory is missing, corrupt, unsafe or inconsistent."""


class ConfigError(LocaldiffError, ValueError):
    """An option, model name or argument is invalid."""


class CacheError(LocaldiffError):
    """A cache file is corrupt or does not match what it claims to hold."""


class NumericsError(LocaldiffError, ArithmeticError):
    """A computation returned NaN or Inf from finite inputs (named by the model that did it)."""


class DistributedError(LocaldiffError, RuntimeError):
    """A collective between the processes of a torchrun job failed (another rank stopped, or a timeout),
    or the ranks disagree about what they exchange; the message names the operation and the cause."""
