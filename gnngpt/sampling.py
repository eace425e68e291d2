"""Autoregressive sampling from a trained model."""
import torch
from torch.nn import functional as F


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    """Append max_new_tokens sampled tokens to idx (B, T), each conditioned on the last context_size tokens."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.context_size:])
        probs = next_token_probs(logits[:, -1, :], temperature, top_k)
        idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def next_token_probs(logits, temperature=1.0, top_k=None):
    """Softmax of logits / temperature, restricted to the top_k most likely tokens when top_k is set."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return F.softmax(logits, dim=-1)
