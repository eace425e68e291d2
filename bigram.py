"""Train the bigram baseline.

    python bigram.py
"""
import sys

from gnngpt.cli import main
from gnngpt.config import BIGRAM

if __name__ == "__main__":
    sys.exit(main(BIGRAM))
