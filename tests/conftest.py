import random

import pytest
import torch

from gnngpt.models import GPTConfig


@pytest.fixture
def tiny_text_file(tmp_path):
    """A few kilobytes of made-up text: enough for tiny models, no network, no real data."""
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    lines = [" ".join(rng.choice(words) for _ in range(8)).capitalize() + "." for _ in range(300)]
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_config(mixer, **overrides):
    cfg = dict(vocab_size=17, block_size=12, n_embd=16, n_head=2, n_layer=2, dropout=0.0, mixer=mixer)
    cfg.update(overrides)
    return GPTConfig(**cfg)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
