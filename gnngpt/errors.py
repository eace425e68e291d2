"""The error types the command-line scripts turn into a one-line message: exit code 2 for bad input, 1 for a
failure of the run itself."""
import sys


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class Failure(Exception):
    """A step of a run failed, not its input: the one-line message says what is kept and how to go on."""


def one_line(error):
    """The first line of an exception's message, with its type when the message is empty."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def exit_code(run, *args):
    """run(*args)'s exit code (0 when it returns None); a UsageError becomes one line on stderr and code 2, a
    Failure one line and code 1, Ctrl-C "interrupted" and code 130."""
    try:
        return run(*args) or 0
    except (UsageError, Failure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
