"""The one error type the command-line scripts turn into a one-line message and exit code 2."""
import sys


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


def one_line(error):
    """The first line of an exception's message, with its type when the message is empty."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def exit_code(run, *args):
    """run(*args)'s exit code (0 when it returns None); a UsageError becomes one line on stderr and code 2."""
    try:
        return run(*args) or 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
