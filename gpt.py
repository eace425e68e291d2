"""Train the character-level transformer baseline (the lecture's GPT).

    python gpt.py
"""
import sys

from gnngpt.errors import quiet_interrupt

with quiet_interrupt(__name__ == "__main__"):  # importing torch takes seconds: Ctrl-C then ends in one line
    from gnngpt.cli import main
    from gnngpt.config import GPT

if __name__ == "__main__":
    sys.exit(main(GPT))
