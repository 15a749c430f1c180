"""The error type every command turns into a one-line message and a non-zero exit."""


class HfsError(Exception):
    """A user-facing error: bad input, missing file, unreachable server. One line, names the culprit."""
