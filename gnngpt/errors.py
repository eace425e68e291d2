"""The error types the command-line scripts turn into a one-line message: exit code 2 for bad input, 1 for a
failure of the run itself."""
import contextlib
import errno
import os
import signal
import sys

from .files import DISK_FULL, write_failure, write_fix


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class TooBig(UsageError):
    """Memory running out at the user's sizes: bad input that each process meets on its own (under torchrun one
    rank may run out alone), so that each one that meets it says so."""


class Failure(Exception):
    """A step of a run failed, not its input: the one-line message says what is kept and how to go on."""


def one_line(error):
    """The first line of an exception's message, with its type when the message is empty."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


TOO_BIG = "the model and batch do not fit in memory"
MAX_COUNT = 2**31 - 1  # past it, a size or count overflows a C integer in torch or in Python's ranges


def check_count(flag, value, least=1):
    """Refuse a count (an integer flag's value) below least (1 or 0) or past MAX_COUNT."""
    if value < least:
        raise UsageError(f"{flag} must be {'a positive integer' if least == 1 else 'zero or more'}, got {value}")
    if value > MAX_COUNT:
        raise UsageError(f"{flag} must be at most 2**31 - 1, got {value}")


def out_of_memory(error):
    """Whether error is an allocation that failed: Python's MemoryError, or torch's on a CPU or a GPU, or one whose
    size in bytes torch cannot even count (not one of the one-line errors that quote it)."""
    if isinstance(error, (UsageError, Failure)):
        return False
    return isinstance(error, MemoryError) or any(text in str(error) for text in (
        "can't allocate memory", "out of memory", "Storage size calculation overflowed"))


def memory_error(error, what, fix, kind=UsageError):
    """kind's one line for memory running out (error): what did not fit, the allocator's first line, and fix."""
    return kind(f"{what} ({one_line(error)[:160]}); {fix}")


def not_utf8(what, error, fix):
    """The UsageError for what (a file, as the message names it) whose bytes are not UTF-8: where the decoding
    failed (error, a UnicodeDecodeError), and fix."""
    return UsageError(f"{what} is not UTF-8 text (byte {error.start}); {fix}")


@contextlib.contextmanager
def fitting(what, fix, kind=UsageError):
    """Memory running out inside becomes memory_error's one line, with fix (or what fix(), a function, returns
    then); any other error passes through."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - torch's allocation failures are RuntimeErrors of their own
        if not out_of_memory(e):
            raise
        raise memory_error(e, what, fix() if callable(fix) else fix, kind) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM where no handler of the project catches it, raised as Python raises KeyboardInterrupt on SIGINT."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def terminated_as_interrupted():
    """Inside, SIGTERM raises Terminated where no handler of it was set: a stop by SIGTERM unwinds as Ctrl-C does,
    so that what is written atomically is left whole and its temporary files go."""
    def terminate(signum, frame):
        raise Terminated

    handles = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if handles:
        signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        if handles:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


class CaughtSignals:
    """While active, SIGINT and SIGTERM go to the handle method of a subclass, and their earlier handlers come
    back on leaving (or on restore)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        # a signal ignored by the parent (such as SIGINT for a background job of a script) stays ignored
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
        for s in self.previous:
            signal.signal(s, self.handle)
        return self

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __exit__(self, *exc):
        self.restore()


def exit_code(run, *args, interrupted="interrupted"):
    """run(*args)'s exit code (0 when it returns None); a UsageError becomes one line on stderr and code 2, a
    Failure one line and code 1, Ctrl-C or SIGTERM the line interrupted and code 130 or 143, an OSError that
    reached here os_error_exit's."""
    try:
        with terminated_as_interrupted():
            code = run(*args) or 0
        flush_output()
        return code
    except (UsageError, Failure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt as e:
        print(interrupted, file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except OSError as e:
        return os_error_exit(e)


@contextlib.contextmanager
def quiet_interrupt(run_as_script):
    """Ctrl-C inside ends the process as exit_code does, "interrupted" and code 130, not a traceback, where
    run_as_script (a module imported elsewhere, as by the tests, lets it through). The scripts import torch inside
    it, which takes seconds."""
    try:
        yield
    except KeyboardInterrupt:
        if not run_as_script:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def os_error_exit(error):
    """The exit code of an OSError no step turned into a message, such as a failed write of the output: a pipe
    whose reader left (as head does) ends quietly with 141, as a shell pipeline's writer does; a path given too
    long for the file system prints one line and gives 2, as bad input; any other prints one line and gives 1."""
    if isinstance(error, BrokenPipeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the exit's flush raises again
        return 128 + signal.SIGPIPE
    reason = error.strerror or one_line(error)
    if getattr(error, "target", None):  # files.atomic_writes' path
        print(f"error: {write_failure(error.target, error, 'its directory')}", file=sys.stderr)
    elif error.errno == errno.ENAMETOOLONG:
        print(f"error: {error.filename}: {reason}; choose a shorter path", file=sys.stderr)
        return 2
    elif error.filename:
        print(f"error: {error.filename}: {reason}{'; free disk space' if error.errno in DISK_FULL else ''}",
              file=sys.stderr)
    else:  # every step names the files it reads, and atomic_writes those it writes: this is the output
        print(f"error: could not write the output ({reason}); {write_fix(error, 'where it goes')}", file=sys.stderr)
    return 1


def check_output(what):
    """A UsageError where standard output is closed (as >&- closes it): print would drop what goes there unseen."""
    if sys.stdout is None:
        raise UsageError(f"standard output is closed, and {what} would be printed there; send it to a file (> FILE) "
                         f"instead of closing it (>&-)")


def flush_output():
    """Flush stdout (None where it was closed): a reader of the output that left, or a full disk, then shows as an
    OSError here, and not at the interpreter's exit."""
    if sys.stdout is not None:
        sys.stdout.flush()
