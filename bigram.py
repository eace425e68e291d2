"""Train the bigram baseline.

    python bigram.py
"""
import sys

from gnngpt.errors import quiet_interrupt

with quiet_interrupt():  # importing torch takes seconds: Ctrl-C meanwhile ends in one line, not a traceback
    from gnngpt.cli import main
    from gnngpt.config import BIGRAM

if __name__ == "__main__":
    sys.exit(main(BIGRAM))
