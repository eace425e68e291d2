"""Optimisations that step aside when they raise: their portable path computes the same values, only slower."""
import os
import sys

from .errors import one_line

NO_FALLBACK = "GNNGPT_NO_FALLBACK"  # set to 1, an optimisation that raises fails the run: checks of the fast paths


class Acceleration:
    """An optimisation used while on. fail(error) turns it off for the rest of the process and says so once, in
    one line on stderr: what failed, the error, and what runs instead; with GNNGPT_NO_FALLBACK=1 in the
    environment it raises the error instead. Only an optimisation whose portable path computes the same values
    gets one: a fallback must never change a result, only its speed."""

    def __init__(self, name, instead):
        self.name, self.instead, self.on = name, instead, True

    def fail(self, error):
        refuse_fallback(error)
        if self.on:
            print(f"warning: {self.name} failed ({type(error).__name__}: {one_line(error)}); "
                  f"{self.instead} from now on", file=sys.stderr)
        self.on = False

    def portable(self, error, compute):
        """compute(), the portable path, where the optimisation raised error; the optimisation goes off (fail) only
        once compute has returned, so that an input both paths refuse raises compute's error and leaves it on."""
        refuse_fallback(error)
        error.with_traceback(None)  # the frames of the failed attempt, and the tensors they hold, go before compute
        result = compute()
        self.fail(error)
        return result


def refuse_fallback(error):
    """Raise error where GNNGPT_NO_FALLBACK=1 is in the environment, instead of stepping aside from it."""
    if os.environ.get(NO_FALLBACK) == "1":
        raise error
