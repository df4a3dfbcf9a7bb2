"""One exception type for user mistakes: the CLI prints its message as a single line and exits 2."""


class SaeforgeError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""
