"""Train the character-level transformer baseline (the lecture's GPT).

    python gpt.py
"""
import sys

from gnngpt.cli import main

if __name__ == "__main__":
    sys.exit(main("gpt"))
