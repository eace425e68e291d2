"""Cached decoding: each layer's per-token tensors kept between steps, and a decoder that computes exactly what
the lecture's sampler computes.

The lecture's sampler predicts each token from one forward pass over the last block_size tokens. CachedDecoder
gives the same logits at every step with less work. While the sequence fits the context, each new token's
per-token tensors are appended to a KVCache and only the new token is computed. Beyond, it depends on how
positions enter: learned absolute positions shift under every token, so the window of the last block_size
tokens is recomputed in full; with relative positions on graphs that reach at most R < block_size tokens back
over all layers (window, dilated), a token's states depend on nothing the window drops, so each layer keeps a
rolling buffer of the tokens its graph reaches and decoding goes on token by token, at a flat cost, forever.
"""
import torch

from .distributed import is_distributed
from .fallback import Acceleration
from .fast_gat import compiled

PIECE = 16  # tokens per pass when a prompt fills rolling buffers: each layer holds its reach plus one piece
CUDA_GRAPHS = Acceleration("capturing or replaying a decoding pass as a CUDA graph",
                           "decoding runs eagerly (the same logits)")


class KVCache:
    """Per-layer buffers of the tokens' per-token tensors, and the position of the token in each slot.

    Token p goes to slot p % capacity of each layer. A pass writes its tokens' tensors into their slots, then
    its queries attend over every slot through a mask computed from the positions: the edges of the layer's
    graph to tokens still held. So every decoding step has the same shapes and keeps its state in the same
    tensors, and on CUDA it can be captured once and replayed as a CUDA graph: the positions live on the device,
    where the step itself advances them. A layer's capacity bounds the tokens of one pass, and must hold every
    token its queries reach: the caller sees to both.
    """

    def __init__(self, graphs, capacities, device):
        slots = {}  # layers of the same graph and capacity share their positions and masks
        for graph, capacity in zip(graphs, capacities):
            slots.setdefault((graph, capacity), Slots(graph, capacity, device))
        self.slots = list(slots.values())
        self.layers = [LayerCache(slots[key]) for key in zip(graphs, capacities)]
        self.next_position = torch.zeros((), dtype=torch.long, device=device)

    def begin(self, T):
        """The positions (T,) of the next T tokens; sets every layer's mask for this pass."""
        positions = self.next_position + torch.arange(T, device=self.next_position.device)
        for slots in self.slots:
            slots.begin(positions)
        return positions

    def advance(self, T):
        self.next_position += T

    def reset(self):
        """Forget every token: the next pass writes from position 0 (into the same buffers)."""
        self.next_position.zero_()
        for slots in self.slots:
            slots.positions.fill_(-1)


class Slots:
    """The position of the token in each of capacity slots (-1: empty), and the mask of the current pass."""

    def __init__(self, graph, capacity, device):
        self.graph, self.capacity = graph, capacity
        self.positions = torch.full((capacity,), -1, dtype=torch.long, device=device)

    def begin(self, positions):
        if positions.numel() > self.capacity:
            raise ValueError(f"{positions.numel()} tokens do not fit a cache of {self.capacity}")
        self.index = positions % self.capacity
        self.positions.index_copy_(0, self.index, positions)
        i, j = positions[:, None], self.positions[None, :]
        edge = self.graph.connects(i, j) & (j >= 0)  # (T, capacity)
        self.bias = torch.zeros(edge.shape, device=edge.device).masked_fill_(~edge, float("-inf"))[None]
        self.distance = torch.where(edge, i - j, 0)[None]  # (1, T, capacity)


class LayerCache:
    """One layer's buffers, arranged as a layout (see layout.py): the new tokens' queries against every slot."""

    def __init__(self, slots):
        self.slots = slots
        self.buffers = {}

    @property
    def bias(self):
        """(1, T, capacity) additive mask of the current pass: 0 where a query sees a slot, -inf elsewhere."""
        return self.slots.bias

    @property
    def distance(self):
        """(1, T, capacity) distance from each query to the token in each slot (0 where it sees none)."""
        return self.slots.distance

    @property
    def band_start(self):
        """The slots' distances follow no band (layout.py): every slot comes before it."""
        return self.slots.capacity

    def rows_reached(self, D):
        """Every row of a table of D distances, (1, D), and the row of each (query, slot) pair, (1, T, capacity)."""
        return torch.arange(D, device=self.distance.device)[None], self.distance

    def queries(self, t):
        return t.unsqueeze(2)  # (B, H, 1, T, ...)

    def keys(self, **new):
        """Write the new tokens' tensors (B, H, T, ...) into their slots; return the buffers (B, H, 1, slots, ...)."""
        out = []
        for key, value in new.items():
            if key not in self.buffers:
                shape = (*value.shape[:2], self.slots.capacity, *value.shape[3:])
                self.buffers[key] = value.new_zeros(shape)
            out.append(self.buffers[key].index_copy_(2, self.slots.index, value).unsqueeze(2))
        return out

    def merge(self, out):
        return out.squeeze(2)  # (B, H, T, C)


class CachedDecoder:
    """Next-token logits of a growing sequence, each what one forward pass over its last context_size tokens gives.

    start(idx) takes the prompt, append(idx_next) each new token; both return the logits of the next token.
    With a rolling cache (relative positions, graphs of reach below context_size) every token takes one cached
    step. Otherwise tokens take cached steps while the sequence fits the context; once it fills the context,
    every token recomputes the window of the last context_size tokens: one forward pass of a fixed shape.

    On CUDA, with the model in eval mode and no autocast, a pass whose kind and input shape come a second time
    (the one-token step, the full window) is captured as a CUDA graph and replayed from then on: one launch
    instead of one per operator. A graph keeps reading the parameters it was captured with, so a decoder serves
    one generation of a model that does not change meanwhile (generate makes a new one each call). Where a capture
    or a replay raises, CUDA_GRAPHS warns once and goes off, and the decoder refills its cache from the window
    eagerly, whatever state the failure left: the logits stay those of the eager passes. Elsewhere,
    with compile, the one-token step is compiled by torch.compile: on a CPU, where a step is hundreds of
    operator calls on one token, compiled code runs it several times faster, after seconds of compiling.
    """

    def __init__(self, model, compile=False):
        self.model = model
        on_cuda = next(model.parameters()).is_cuda  # there the CUDA graphs do the compiling's job
        self.one_token_pass = compiled(self.cached_pass, dynamic=False) if compile and not on_cuda \
            else self.cached_pass
        self.context = model.context_size
        self.rolling = model.reach is not None and model.reach < self.context
        if self.rolling:
            self.piece = min(self.context, PIECE)
            self.capacities = [g.reach + self.piece for g in model.graphs]
        else:
            self.piece = self.context
            self.capacities = [self.context] * len(model.graphs)
        self.cache = None
        self.shapes_seen = set()
        self.graphs = {}  # (pass, input shape) -> the replay of its CUDA graph

    def start(self, idx):
        """Take in the prompt idx (B, T), of which the last context_size tokens count; the next-token logits."""
        self.window = idx[:, -self.context:]
        return self.eager_on_failure(self.take_window)

    def append(self, idx_next):
        """Take in the tokens idx_next (B, 1); the next-token logits."""
        if self.rolling or self.window.size(1) < self.context:
            self.window = torch.cat((self.window, idx_next), dim=1)[:, -self.context:]
            return self.eager_on_failure(self.forward, self.one_token_pass, idx_next)
        self.window = torch.cat((self.window[:, 1:], idx_next), dim=1)
        return self.eager_on_failure(self.forward, self.full_pass, self.window)

    def take_window(self):
        """Fill the cache afresh with the window, in pieces; the next-token logits."""
        if self.cache is None:
            self.cache = KVCache(self.model.graphs, self.capacities, self.window.device)
        self.cache.reset()
        for piece in self.window.split(self.piece, dim=1):
            logits = self.forward(self.cached_pass, piece)
        return logits

    def eager_on_failure(self, step, *args):
        """step(*args); where a CUDA graph failed in it, the logits of the window taken in again eagerly."""
        try:
            return step(*args)
        except CUDAGraphFailed as failure:
            CUDA_GRAPHS.fail(failure.__cause__)
            self.graphs.clear()
            return self.take_window()

    def cached_pass(self, idx):
        """The next-token logits after the tokens idx (B, T), which the cache takes in."""
        logits, _ = self.model.forward(idx, cache=self.cache, last_only=True)  # eager, as in full_logits
        return logits[:, -1, :]

    def full_pass(self, idx):
        """The next-token logits after the window idx (B, context_size), computed without the cache."""
        return full_logits(self.model, idx)

    @torch.no_grad()
    def forward(self, run_pass, idx):
        key = (run_pass.__name__, idx.shape)
        try:
            if key in self.graphs:
                return self.graphs[key](idx)
            if key in self.shapes_seen and CUDA_GRAPHS.on and self.can_capture(idx):
                self.graphs[key], logits = capture(run_pass, idx)
                return logits
        except Exception as e:  # whatever the graph machinery raised: the eager pass that follows decides
            raise CUDAGraphFailed from e
        self.shapes_seen.add(key)
        return run_pass(idx)

    def can_capture(self, idx):
        # a process group's watchdog thread may query CUDA, which breaks a capture (in its default, global mode)
        return (idx.is_cuda and not self.model.training and not torch.is_autocast_enabled("cuda")
                and not is_distributed())


class CUDAGraphFailed(Exception):
    """Capturing or replaying a pass as a CUDA graph raised (the error is its __cause__)."""


def capture(run_pass, idx):
    """Run the pass on a side stream, as the warm-up that capturing needs, then record it there as a CUDA graph
    (recording runs nothing). Returns the graph's replay, a function of the input like run_pass, and the logits
    of the warm-up.

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

    def replay(new_idx):
        graph_input.copy_(new_idx)
        graph.replay()
        return graph_output.clone()

    return replay, logits


def full_logits(model, idx):
    """Next-token logits (B, vocab_size) from the last context_size tokens of idx, computed in full.

    It calls the model's forward itself: a model compiled for training (model.compile()) would otherwise be
    compiled again for the shapes of decoding. The GATv2 score kernel, compiled on its own, still runs.
    """
    logits, _ = model.forward(idx[:, -model.context_size:], last_only=True)
    return logits[:, -1, :]
