"""Autoregressive sampling from a trained model, with a key/value cache where the model has one."""
from pathlib import Path

import torch
from torch.nn import functional as F

from .checkpoint import atomic_write
from .distributed import is_distributed
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

    On CUDA, with the model in eval mode and no autocast, a forward pass whose input shape comes a second time
    (the one-token step, the restart of the window) is captured as a CUDA graph and replayed from then on:
    it is then one launch instead of one per operator. A graph keeps reading the parameters it was captured
    with, so a decoder serves one generation of a model that does not change meanwhile (generate makes a
    new one each call).
    """

    def __init__(self, model):
        self.model = model
        self.keep = max(1, model.context_size // 2)
        self.cache = None
        self.shapes_seen = set()
        self.graphs = {}  # input shape -> (graph, its input, its output)

    def start(self, idx):
        """Fill the cache with the last context_size tokens of idx (B, T); the next-token logits."""
        self.window = idx[:, -self.model.context_size:]
        if self.cache is None:
            self.cache = KVCache(len(self.model.blocks), self.model.context_size, idx.device)
        self.cache.reset()
        return self.forward(self.window)

    def append(self, idx_next):
        """Add the tokens idx_next (B, 1); the next-token logits."""
        if self.window.size(1) == self.model.context_size:
            tail = self.window[:, self.window.size(1) + 1 - self.keep:]
            return self.start(torch.cat((tail, idx_next), dim=1))
        self.window = torch.cat((self.window, idx_next), dim=1)
        return self.forward(idx_next)

    @torch.no_grad()
    def forward(self, idx):
        """The next-token logits after the tokens idx (B, T), which the cache takes in."""
        if idx.shape in self.graphs:
            graph, graph_input, graph_output = self.graphs[idx.shape]
            graph_input.copy_(idx)
            graph.replay()
            return graph_output.clone()
        if idx.shape in self.shapes_seen and self.can_capture(idx):
            return self.capture(idx)
        self.shapes_seen.add(idx.shape)
        return self.step(idx)

    def step(self, idx):
        logits, _ = self.model(idx, cache=self.cache)
        return logits[:, -1, :]

    def can_capture(self, idx):
        # a process group's watchdog thread may query CUDA, which breaks a capture (in its default, global mode)
        return (idx.is_cuda and not self.model.training and not torch.is_autocast_enabled("cuda")
                and not is_distributed())

    def capture(self, idx):
        """Run step on a side stream, as the warm-up that capturing needs, then record it there as a CUDA graph
        (recording runs nothing). Returns the step's logits.

        capture_begin and capture_end are called directly, not through torch.cuda.graph, which first runs
        gc.collect() (250 ms in a bench.py process on a 2-core CPU) and empty_cache().
        """
        stream = torch.cuda.Stream(idx.device)
        stream.wait_stream(torch.cuda.current_stream(idx.device))
        graph, graph_input = torch.cuda.CUDAGraph(), idx.clone()
        with torch.cuda.stream(stream):
            logits = self.step(idx)
            graph.capture_begin()
            try:
                graph_output = self.step(graph_input)
            finally:
                graph.capture_end()
        torch.cuda.current_stream(idx.device).wait_stream(stream)
        logits.record_stream(torch.cuda.current_stream(idx.device))  # made on the side stream, used on this one
        self.graphs[idx.shape] = graph, graph_input, graph_output
        return logits


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
