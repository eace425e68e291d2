"""Cached decoding: the key/value cache of every layer, and a decoder that computes what the lecture's sampler computes.

The lecture's sampler predicts each token from one forward pass over the last block_size tokens. CachedDecoder
gives the same logits at every step with less work: while the sequence fits the context, each new token's
per-token tensors are appended to a KVCache and only the new token is computed; beyond, learned absolute
positions shift under every token, so the window of the last block_size tokens is recomputed in full.
"""
import torch

from .distributed import is_distributed
from .graph import causal_bias


class KVCache:
    """The per-token tensors of every layer for up to capacity tokens, in buffers of a fixed size.

    A forward pass with the cache writes the tensors of its tokens at the next free positions and attends over
    every slot, through a mask that hides each query's later slots (and those never written). So every decoding
    step has the same shapes and keeps its state in the same tensors, and on CUDA it can be captured once and
    replayed as a CUDA graph: the next free position lives on the device, where the step itself advances it.
    The caller keeps the number of tokens within capacity: past it, the position is only known on the device,
    and an index out of range fails there (on CUDA, as an assertion that breaks the CUDA context).
    """

    def __init__(self, n_layer, capacity, device):
        self.capacity = capacity
        self.layers = [LayerCache(self) for _ in range(n_layer)]
        self.next_position = torch.zeros((), dtype=torch.long, device=device)
        self.causal_bias = causal_bias(capacity, device)  # row p: the mask of a query at position p

    def begin(self, T):
        """The positions (T,) of the next T tokens; sets the mask of this pass, bias (T, capacity)."""
        if T > self.capacity:
            raise ValueError(f"{T} tokens do not fit a cache of {self.capacity}")
        self.positions = self.next_position + torch.arange(T, device=self.next_position.device)
        self.bias = self.causal_bias.index_select(0, self.positions)
        return self.positions

    def advance(self, T):
        self.next_position += T

    def reset(self):
        """Forget every token: the next pass writes from position 0 (into the same buffers)."""
        self.next_position.zero_()


class LayerCache:
    """One layer's buffers in a KVCache."""

    def __init__(self, cache):
        self.cache = cache
        self.buffers = {}

    @property
    def bias(self):
        """(T, capacity) additive mask of the current pass: 0 where a query sees a slot, -inf elsewhere."""
        return self.cache.bias

    def extend(self, **new):
        """Write the new tokens' tensors (B, H, T, ...) at their positions; return the whole (B, H, capacity, ...)."""
        out = []
        for key, value in new.items():
            if key not in self.buffers:
                shape = (*value.shape[:2], self.cache.capacity, *value.shape[3:])
                self.buffers[key] = value.new_zeros(shape)
            out.append(self.buffers[key].index_copy_(2, self.cache.positions, value))
        return out


class CachedDecoder:
    """Next-token logits of a growing sequence, each computed from its last context_size tokens.

    start(idx) takes the prompt, append(idx_next) each new token; both return the logits of the next token.
    While the sequence fits the context, the cache takes in only the new tokens. Once it fills the context, every
    token recomputes the window of the last context_size tokens: one forward pass of a fixed shape.

    On CUDA, with the model in eval mode and no autocast, a pass whose kind and input shape come a second time
    (the one-token step, the full window) is captured as a CUDA graph and replayed from then on: one launch
    instead of one per operator. A graph keeps reading the parameters it was captured with, so a decoder serves
    one generation of a model that does not change meanwhile (generate makes a new one each call).
    """

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.shapes_seen = set()
        self.graphs = {}  # (pass, input shape) -> (graph, its input, its output)

    def start(self, idx):
        """Take in the prompt idx (B, T), of which the last context_size tokens count; the next-token logits."""
        self.window = idx[:, -self.model.context_size:]
        if self.cache is None:
            self.cache = KVCache(len(self.model.blocks), self.model.context_size, idx.device)
        self.cache.reset()
        return self.forward(self.cached_pass, self.window)

    def append(self, idx_next):
        """Take in the tokens idx_next (B, 1); the next-token logits."""
        if self.window.size(1) < self.model.context_size:
            self.window = torch.cat((self.window, idx_next), dim=1)
            return self.forward(self.cached_pass, idx_next)
        self.window = torch.cat((self.window[:, 1:], idx_next), dim=1)
        return self.forward(self.full_pass, self.window)

    def cached_pass(self, idx):
        """The next-token logits after the tokens idx (B, T), which the cache takes in."""
        logits, _ = self.model.forward(idx, cache=self.cache)  # eager, as in full_logits
        return logits[:, -1, :]

    def full_pass(self, idx):
        """The next-token logits after the window idx (B, context_size), computed without the cache."""
        return full_logits(self.model, idx)

    @torch.no_grad()
    def forward(self, run_pass, idx):
        key = (run_pass.__name__, idx.shape)
        if key in self.graphs:
            graph, graph_input, graph_output = self.graphs[key]
            graph_input.copy_(idx)
            graph.replay()
            return graph_output.clone()
        if key in self.shapes_seen and self.can_capture(idx):
            return self.capture(key, run_pass, idx)
        self.shapes_seen.add(key)
        return run_pass(idx)

    def can_capture(self, idx):
        # a process group's watchdog thread may query CUDA, which breaks a capture (in its default, global mode)
        return (idx.is_cuda and not self.model.training and not torch.is_autocast_enabled("cuda")
                and not is_distributed())

    def capture(self, key, run_pass, idx):
        """Run the pass on a side stream, as the warm-up that capturing needs, then record it there as a CUDA graph
        (recording runs nothing). Returns the pass's logits.

        capture_begin and capture_end are called directly, not through torch.cuda.graph, which first runs
        gc.collect() (250 ms in a bench.py process on a 2-core CPU) and empty_cache().
        """
        stream = torch.cuda.Stream(idx.device)
        stream.wait_stream(torch.cuda.current_stream(idx.device))
        graph, graph_input = torch.cuda.CUDAGraph(), idx.clone()
        with torch.cuda.stream(stream):
            logits = run_pass(idx)
            graph.capture_begin()
            try:
                graph_output = run_pass(graph_input)
            finally:
                graph.capture_end()
        torch.cuda.current_stream(idx.device).wait_stream(stream)
        logits.record_stream(torch.cuda.current_stream(idx.device))  # made on the side stream, used on this one
        self.graphs[key] = graph, graph_input, graph_output
        return logits


def full_logits(model, idx):
    """Next-token logits (B, vocab_size) from the last context_size tokens of idx, computed in full.

    It calls the model's forward itself: a model compiled for training (model.compile()) would otherwise be
    compiled again for the shapes of decoding. The GATv2 score kernel, compiled on its own, still runs.
    """
    logits, _ = model.forward(idx[:, -model.context_size:])
    return logits[:, -1, :]
