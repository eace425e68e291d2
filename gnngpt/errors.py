"""The one error type the command-line scripts turn into a one-line message and exit code 2."""


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix."""
