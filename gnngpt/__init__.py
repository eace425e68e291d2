"""GPT with graph-attention token mixers from PyTorch Geometric, plus its baselines."""
