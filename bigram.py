"""Train the bigram baseline.

    python bigram.py
"""
import sys

from gnngpt.errors import quiet_interrupt

with quiet_interrupt(__name__ == "__main__"):  # importing torch takes seconds: Ctrl-C then ends in one line
    from gnngpt.cli import main
    from gnngpt.config import BIGRAM

if __name__ == "__main__":
    sys.exit(main(BIGRAM))
