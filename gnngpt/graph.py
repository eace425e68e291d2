"""Causal context graphs: which earlier tokens j send a message to token i, as edges and as masks.

Every graph has edges j -> i with j <= i only, the self-loop j = i included. The original model runs on the
complete causal graph (`full`); the others keep a subset of its edges:

    full          every j <= i
    window:W      i - W < j <= i                                     (Longformer, Mistral)
    dilated:W:D   j = i - k*D for k = 0 .. W-1                        (Longformer's dilation)
    strided:W:S   the window of W, plus every j with (i - j) divisible by S   (Sparse Transformer)
    sink:G:W      the first G tokens of the sequence, plus the window of W    (attention sinks, StreamingLLM)

A spec is one of these, or a comma-separated list of n_layer of them, one graph per layer.
"""
import functools
from dataclasses import dataclass

import torch

from .errors import UsageError
from .lists import list_items

KINDS = {"full": (), "window": ("W",), "dilated": ("W", "D"), "strided": ("W", "S"), "sink": ("G", "W")}
MAX_PARAM = 2**31 - 1  # so that products of two parameters stay within int64
GRAPH_HELP = "full, window:W, dilated:W:D, strided:W:S or sink:G:W, or a comma-separated list of one per layer"


def eager_cache(maxsize):
    """functools.lru_cache(maxsize) for the eager calls of a function of a graph's shape alone; under torch.compile
    the function runs as written, traced into the compiled code (which Dynamo would do anyway, past the cache,
    warning that it does). The cache's tensors are shared: treat them as read-only."""
    def decorate(function):
        cached = functools.lru_cache(maxsize=maxsize)(function)

        @functools.wraps(function)
        def call(*args):
            return function(*args) if torch.compiler.is_compiling() else cached(*args)

        call.cache_clear = cached.cache_clear
        return call
    return decorate


@dataclass(frozen=True)
class ContextGraph:
    """One causal context graph: its kind and its integer parameters (see KINDS)."""

    kind: str
    params: tuple = ()

    @property
    def spec(self):
        return ":".join([self.kind, *map(str, self.params)])

    def connects(self, i, j):
        """Whether j -> i is an edge, elementwise over broadcast integer tensors of target and source positions."""
        d = i - j
        edge = (d >= 0) & (j >= 0)
        if self.kind == "window":
            (W,) = self.params
            edge &= d < W
        elif self.kind == "dilated":
            W, D = self.params
            edge &= (d % D == 0) & (d < W * D)
        elif self.kind == "strided":
            W, S = self.params
            edge &= (d < W) | (d % S == 0)
        elif self.kind == "sink":
            G, W = self.params
            edge &= (j < G) | (d < W)
        return edge

    @property
    def reach(self):
        """The largest i - j of an edge, or None where it grows with the sequence (full, strided, sink)."""
        if self.kind == "window":
            return self.params[0] - 1
        if self.kind == "dilated":
            W, D = self.params
            return (W - 1) * D
        return None

    @property
    def sinks(self):
        """How many first tokens of the sequence every later token sees, beyond its window (sink graphs)."""
        return self.params[0] if self.kind == "sink" else 0

    @property
    def window(self):
        """The largest i - j of the non-sink edges of a sink graph, else reach (None when unbounded)."""
        return self.params[1] - 1 if self.kind == "sink" else self.reach

    def mask(self, T, device="cpu"):
        """(T, T) bool: mask[i, j] is whether j -> i is an edge."""
        positions = torch.arange(T, device=device)
        return self.connects(positions[:, None], positions[None, :])

    def bias(self, T, device="cpu", dtype=torch.float32):
        """(T, T) additive mask: 0 on the edges, -inf elsewhere (adding it before a softmax masks the scores)."""
        return graph_bias(self, T, torch.device(device), dtype)

    def edges_per_token(self, T):
        """The mean in-degree over a sequence of T tokens."""
        return self.mask(T).sum().item() / T

    def edge_index(self, batch_size, seq_len, device="cpu"):
        """(2, E) edges of batch_size sequences of seq_len nodes, node ids offset by b * seq_len; row 0 sources."""
        return graph_edge_index(self, batch_size, seq_len, torch.device(device))


FULL = ContextGraph("full")


@eager_cache(maxsize=64)
def graph_bias(graph, T, device, dtype):
    mask = graph.mask(T, device)
    return torch.zeros((T, T), dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))


@eager_cache(maxsize=32)
def graph_edge_index(graph, batch_size, seq_len, device):
    """The edges of one sequence, in order of target then source, repeated per sequence. A window-like graph
    builds them from its candidate sources per target (reach + 1 of them, plus its sinks, neither more than the
    sequence holds), so memory grows with the edges; the others from the (T, T) mask."""
    targets = torch.arange(seq_len, device=device)
    if graph.reach is not None or graph.kind == "sink":
        window = torch.arange(min(graph.window, seq_len - 1) + 1, device=device)
        candidates = targets[:, None] - window.flip(0)[None, :]  # (T, window + 1): the band, in ascending order
        if graph.sinks:
            n_sinks = min(graph.sinks, seq_len)
            band = candidates >= n_sinks  # sinks come from their own columns, once
            sinks = torch.arange(n_sinks, device=device).expand(seq_len, -1)
            candidates = torch.cat((sinks, torch.where(band, candidates, -1)), dim=1)
        keep = graph.connects(targets[:, None], candidates)
        dst, src = targets[:, None].expand_as(candidates)[keep], candidates[keep]
    else:
        dst, src = graph.mask(seq_len, device).nonzero(as_tuple=True)
    offsets = torch.arange(batch_size, device=device).repeat_interleave(dst.numel()) * seq_len
    return torch.stack([src.repeat(batch_size) + offsets, dst.repeat(batch_size) + offsets])


def causal_edge_index(batch_size, seq_len, device="cpu"):
    """Edges j -> i for all j <= i (the complete causal graph) in each of batch_size sequences of seq_len nodes.

    Returns a (2, batch_size * seq_len * (seq_len + 1) / 2) LongTensor: row 0 holds sources, row 1 targets.
    Cached per shape and device; treat the result as read-only.
    """
    return FULL.edge_index(batch_size, seq_len, device)


def parse_graph(spec, n_layer, flag="--graph"):
    """The graph of each of n_layer layers for a spec (see the module docstring); UsageError if malformed, naming
    flag (compare.py's and bench.py's --graphs, where a per-layer list stands in brackets)."""
    if "[" in spec or "]" in spec:
        raise UsageError(f"--graph {spec!r} has a bracket; write a per-layer list without brackets, as in "
                         f"window:4,window:16 (only compare.py's --graphs groups one in brackets)")
    parts = list_items(spec, flag, "window:4,full")
    where = f"{flag} {f'[{spec}]' if flag == '--graphs' and len(parts) > 1 else spec!r}"
    if len(parts) not in (1, n_layer):
        fix = "give one graph" if n_layer == 1 else f"give one graph for every layer or one for each of the {n_layer}"
        raise UsageError(f"{where} lists {len(parts)} graphs for {n_layer} layer{'s' * (n_layer > 1)}; {fix}")
    graphs = tuple(parse_one_graph(p, where) for p in parts)
    return graphs * n_layer if len(graphs) == 1 else graphs


def parse_one_graph(text, where):
    kind, *values = text.split(":")
    if kind not in KINDS:
        raise UsageError(f"{where}: unknown graph {kind!r}; use {GRAPH_HELP}")
    names = KINDS[kind]
    usage = ":".join([kind, *names])
    if len(values) != len(names):
        raise UsageError(f"{where}: {kind} takes {len(names)} number(s), as in {usage}")
    params = []
    for name, value in zip(names, values):
        if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_PARAM:
            raise UsageError(f"{where}: {name} must be an integer from 1 to {MAX_PARAM}, got {value!r} "
                             f"(in {usage})")
        params.append(int(value))
    return ContextGraph(kind, tuple(params))


def graph_spec(graphs):
    """The canonical spec of a tuple of per-layer graphs: one graph's spec when all layers share it."""
    specs = [g.spec for g in graphs]
    return specs[0] if len(set(specs)) == 1 else ",".join(specs)
