"""The package's errors that reach a user as one message: a bad setting or a bad command-line input.

A module of its own, below every other, so that any module can raise them without importing
the command line or the experiment (which import nearly everything).
"""


class ExperimentError(ValueError):
    """A setting of the experiment is wrong; raised before any trial starts."""


class UsageError(Exception):
    """Bad input from the command line: printed as one message, exit code 2."""
