"""The one exception type for mistakes a user can fix."""


class ZooError(ValueError):
    """Bad input that the user can fix: the message names the problem and the fix.

    The ``zoo`` command prints the message on one line of stderr and exits with status 2;
    library callers can catch it as a ``ValueError``.
    """
