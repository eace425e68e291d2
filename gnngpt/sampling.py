"""Autoregressive sampling from a trained model: the lecture's sampler, and the same distribution with a cache."""
import traceback
from pathlib import Path

import torch
from torch.nn import functional as F

from .decoder import CachedDecoder, full_logits
from .errors import one_line
from .files import atomic_write_text
from .rundir import SAMPLE_FILE

SAMPLE_LENGTH = 500  # characters sampled into sample_path(...) after training


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True,
             compile=False):
    """Append max_new_tokens sampled tokens to idx (B, T) (see sample_tokens)."""
    tokens = sample_tokens(model, idx, max_new_tokens, temperature, top_k, generator, use_cache, compile)
    return torch.cat((idx, *tokens), dim=1)


@torch.no_grad()
def sample_tokens(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True,
                  compile=False):
    """Yield max_new_tokens tokens (B, 1) sampled one after another after the tokens idx (B, T).

    Each token is drawn from the logits of one forward pass over the last context_size tokens (the lecture's
    sampler). With use_cache, where the model supports it, a CachedDecoder computes those same logits with less
    work (compile: its one-token step compiled by torch.compile); use_cache=False runs the lecture's sampler.
    """
    cached = use_cache and model.supports_cache
    decoder = CachedDecoder(model, compile) if cached else None
    logits = decoder.start(idx) if decoder else full_logits(model, idx)
    for i in range(max_new_tokens):
        probs = next_token_probs(logits, temperature, top_k)
        idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
        yield idx_next
        if i + 1 < max_new_tokens and decoder:
            logits = decoder.append(idx_next)
        elif i + 1 < max_new_tokens:
            idx = torch.cat((idx, idx_next), dim=1)[:, -model.context_size:]
            logits = full_logits(model, idx)


def next_token_probs(logits, temperature=1.0, top_k=None):
    """Softmax of logits / temperature, restricted to the top_k most likely tokens when top_k is set."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return F.softmax(logits, dim=-1)


def sample_path(out_dir):
    """Where the sample of the run in out_dir goes: out_dir/sample.txt, beside the run, so that no training writes
    over a shipped sample (compare.py copies its models' samples to model_outputs/)."""
    return Path(out_dir) / SAMPLE_FILE


def write_model_output(model, tokenizer, path, device):
    """Sample SAMPLE_LENGTH characters after a token 0 and write them to path (see sample_path); returns the text."""
    context = torch.zeros((1, 1), dtype=torch.long, device=device)
    text = tokenizer.decode(generate(model, context, SAMPLE_LENGTH)[0].tolist())
    atomic_write_text(path, text)
    return text


def sampling_failure(error):
    """An error raised while sampling in one line, and whether the cached decoder raised it: then the lecture's
    sampler (use_cache=False, sample.py --no_cache) may get around it. The decoder raised it where its innermost
    frame in decoder.py is not full_logits, which the lecture's sampler runs too."""
    in_decoder = full_logits.__code__.co_filename
    frames = [f.name for f in traceback.extract_tb(error.__traceback__) if f.filename == in_decoder]
    return f"{type(error).__name__}: {one_line(error)}", bool(frames) and frames[-1] != full_logits.__name__
