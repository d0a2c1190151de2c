"""The one user-facing error type.

Raise `BeitError` for every mistake a user can fix (a missing path, a wrong preset, a checkpoint of the
wrong shape, shards from two tokenizers). The CLI prints its message as one line and exits with code 2;
library callers can catch it.
"""


class BeitError(Exception):
    """A user-fixable problem. The message names the problem and, where possible, the fix."""

    exit_code = 2
