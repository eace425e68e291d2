"""Train a character-level GPT whose self-attention is a PyTorch Geometric graph layer.

    python pyg-gpt.py --gat_version GATv2Conv
"""
import sys

from gnngpt.errors import quiet_interrupt

with quiet_interrupt(__name__ == "__main__"):  # importing torch takes seconds: Ctrl-C then ends in one line
    from gnngpt.cli import main
    from gnngpt.config import PYG_GPT

if __name__ == "__main__":
    sys.exit(main(PYG_GPT))
