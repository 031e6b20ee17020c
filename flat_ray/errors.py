"""Exceptions that mean "the user asked for something invalid".

The CLI turns these into one line on stderr and exit code 2. Anything else is a bug and keeps its traceback.
"""


class FlatRayError(ValueError):
    """A user mistake: bad config, unknown key, missing file. The message is shown verbatim, on one line."""
