"""Autoregressive sampling from a trained model, with a key/value cache where the model has one."""
from pathlib import Path

import torch
from torch.nn import functional as F

from .checkpoint import atomic_write
from .models import KVCache

SAMPLE_LENGTH = 500  # characters written to model_outputs/<name>.txt after training


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
    """Append max_new_tokens sampled tokens to idx (B, T).

    Without a cache, each token is conditioned on the last context_size tokens, recomputed in full (the lecture's
    sampler). With a cache (CachedDecoder), each token costs work linear in the context instead.
    """
    with torch.compiler.set_stance("force_eager"):  # decoding shapes change every step: no recompiling
        decoder = CachedDecoder(model) if use_cache and getattr(model, "supports_cache", False) else None
        logits = decoder.start(idx) if decoder else full_logits(model, idx)
        for i in range(max_new_tokens):
            probs = next_token_probs(logits, temperature, top_k)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
            if i + 1 < max_new_tokens:
                logits = decoder.append(idx_next) if decoder else full_logits(model, idx)
    return idx


def full_logits(model, idx):
    """Next-token logits (B, vocab_size) from the last context_size tokens of idx, computed in full."""
    logits, _ = model(idx[:, -model.context_size:])
    return logits[:, -1, :]


class CachedDecoder:
    """Incremental decoding over a window of at most context_size tokens.

    Tokens are appended to the model's KVCache while the window has room. When it is full, the window restarts
    from its last half (one full forward pass of those tokens, at positions from 0), so no position beyond
    block_size is ever used. Within the first context_size tokens this is exactly the lecture's sampler;
    after that each token sees between context_size / 2 and context_size earlier tokens instead of always
    context_size. `window` holds the tokens the cache covers.
    """

    def __init__(self, model):
        self.model = model
        self.keep = max(1, model.context_size // 2)

    def start(self, idx):
        """Fill the cache with the last context_size tokens of idx (B, T); the next-token logits."""
        self.window = idx[:, -self.model.context_size:]
        self.cache = KVCache(len(self.model.blocks))
        logits, _ = self.model(self.window, cache=self.cache)
        return logits[:, -1, :]

    def append(self, idx_next):
        """Add the tokens idx_next (B, 1); the next-token logits."""
        if self.window.size(1) == self.model.context_size:
            tail = self.window[:, self.window.size(1) + 1 - self.keep:]
            return self.start(torch.cat((tail, idx_next), dim=1))
        self.window = torch.cat((self.window, idx_next), dim=1)
        logits, _ = self.model(idx_next, cache=self.cache)
        return logits[:, -1, :]


def next_token_probs(logits, temperature=1.0, top_k=None):
    """Softmax of logits / temperature, restricted to the top_k most likely tokens when top_k is set."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return F.softmax(logits, dim=-1)


def model_output_path(name):
    """Where the sample of the model called name goes: model_outputs/<name>.txt in the working directory."""
    return Path("model_outputs") / f"{name}.txt"


def write_model_output(model, tokenizer, name, device):
    """Sample SAMPLE_LENGTH characters after a token 0 and write them to model_outputs/<name>.txt.

    Returns the text and the path.
    """
    context = torch.zeros((1, 1), dtype=torch.long, device=device)
    text = tokenizer.decode(generate(model, context, SAMPLE_LENGTH)[0].tolist())
    path = model_output_path(name)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return text, path
