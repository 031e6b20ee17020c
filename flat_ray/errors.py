"""Exceptions that mean "the user asked for something invalid" or "the run could not finish".

The CLI turns these into one line on stderr and exit code ``exit_code``. Anything else is a bug and keeps its
traceback.
"""


class FlatRayError(ValueError):
    """A user mistake: bad config, unknown key, missing file. The message is shown verbatim, on one line."""

    exit_code = 2


class RunFailed(FlatRayError):
    """A run started but did not finish (diverged, worker error); its MLflow run is marked FAILED."""

    exit_code = 1


class Diverged(RunFailed):
    """A run stopped because its loss or gradient norm stopped being finite (lower the learning rate)."""


class StorageError(RunFailed):
    """A checkpoint or model could not be written (disk full, permission denied, storage unreachable)."""


class IncompleteCheckpoint(RunFailed):
    """A checkpoint lacks a file or a rank's manifest, or holds a file of the wrong size (cut short while written)."""
