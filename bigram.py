"""Train the bigram baseline.

    python bigram.py
"""
import sys

from gnngpt.cli import main

if __name__ == "__main__":
    sys.exit(main("bigram"))
