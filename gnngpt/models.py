"""The graph-attention GPT, the transformer it is compared with, and the bigram baseline.

Read top to bottom: the config, the graph layer that replaces attention (PyG's message passing on a causal
context graph of the tokens, graph.py), the transformer's attention on the same graph, the block and the GPT
around either, then the bigram. Two fast paths compute the same functions with less work: fast_gat.py runs
GATConv and GATv2Conv, and fast_transformer.py TransformerConv, as masked dense attention with the PyG layer's
own weights (keys arranged by layout.py), and decoder.py caches each layer's per-token tensors for sampling.
Building any other PyG layer as the mixer is mixers.py's job.

Positions enter in one of two ways: "abs", the original's learned embedding of each position, added to the
tokens; or "rel", no embedding, and each edge j -> i carries its distance i - j instead: as an edge feature to
the PyG layers that take one, as a learned bias per head and distance to the transformer's scores.
"""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn import functional as F

from .fast_gat import dense_gat, gat_refusal
from .fast_transformer import dense_transformer, transformer_refusal
from .graph import FULL, parse_graph
from .layout import attention, layout_for
from .mixers import TokenMixer, build_conv, run_conv


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 64
    n_embd: int = 128
    n_head: int = 4
    n_layer: int = 4
    dropout: float = 0.0
    mixer: str = "attention"  # "attention" (the transformer) or the name of a PyG convolution
    mixer_kwargs: dict = field(default_factory=dict)  # extra constructor arguments of the PyG layer
    backend: str = "fast"  # GATConv, GATv2Conv, TransformerConv: "fast" (dense attention) or "pyg" (message passing)
    graph: str = "full"  # the context graph of every layer, or one per layer (see graph.py)
    pos: str = "abs"  # "abs": learned position embeddings; "rel": the distance i - j of each edge

    def __post_init__(self):
        """Refuse heads that do not split the width (the scripts check their flags before, with the flags' names)."""
        sizes = (self.n_embd, self.n_head)
        if not (all(isinstance(n, int) and n > 0 for n in sizes) and self.n_embd % self.n_head == 0):
            raise ValueError(f"n_head {self.n_head!r} does not divide n_embd {self.n_embd!r}")

    @classmethod
    def from_settings(cls, settings, vocab_size, **fields):
        """The model of a training-settings dict (sizes as in gnngpt.config.PRESETS, graph and positions), with
        other fields given."""
        sizes = {k: settings[k] for k in ("block_size", "n_embd", "n_head", "n_layer", "dropout")}
        graph = {k: settings[k] for k in ("graph", "pos") if k in settings}  # the original's when not given
        return cls(vocab_size=vocab_size, **sizes, **graph, **fields)


class GraphMixer(nn.Module):
    """A PyG convolution on the context graph of the tokens (token j sends to token i, j <= i), then dropout.

    The reference path flattens the batch into one graph of B*T nodes and runs PyG's message passing, each edge
    carrying its distance when the layer reads edge features. With the fast backend, GATConv, GATv2Conv and
    TransformerConv compute the same function as masked dense attention (fast_gat.py, fast_transformer.py).
    """

    def __init__(self, cfg, graph):
        super().__init__()
        self.graph = graph
        self.block_size = cfg.block_size
        self.conv = build_conv(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        # why the fast backend does not compute this layer ("" when it does)
        self.dense_refusal = dense_refusal(self.conv) if cfg.backend == "fast" else PYG_ASKED
        self.dense = not self.dense_refusal

    def forward(self, x, cache=None):
        B, T, C = x.shape
        if not self.dense:
            if cache is not None:
                raise ValueError("only the fast backend of GATConv, GATv2Conv and TransformerConv decodes with a "
                                 "cache")
            edge_index = self.graph.edge_index(B, T, x.device)  # (2, E): sources, targets
            y = run_conv(self.conv, x.reshape(B * T, C), edge_index, self.block_size).view(B, T, C)
        else:
            layout = cache if cache is not None else layout_for(self.graph, T, x.device)
            if isinstance(self.conv, TokenMixer):  # a TransformerConv
                y = dense_transformer(self.conv, x, layout, self.block_size,  # (B, T, C), the same
                                      causal=cache is None and self.graph == FULL)
            else:
                y = dense_gat(self.conv, x, layout, self.block_size, fused=cache is None)
        return self.dropout(y)


PYG_ASKED = "--backend pyg"  # the dense_refusal of a layer run on PyG because the run asked for it


def dense_refusal(conv):
    """Why the fast backend cannot compute the mixer conv exactly, or "" when it can (fast_gat.py for GATConv and
    GATv2Conv, fast_transformer.py for TransformerConv)."""
    return transformer_refusal(conv) if isinstance(conv, TokenMixer) else gat_refusal(conv)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention as in the lecture model, masked by the context graph: on the complete
    graph with absolute positions it is the lecture's, computed by scaled_dot_product_attention. With relative
    positions each head adds a learned bias per distance i - j to its scores (as T5 does)."""

    def __init__(self, cfg, graph):
        super().__init__()
        self.graph = graph
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.distance_bias = nn.Parameter(torch.zeros(cfg.n_head, cfg.block_size)) if cfg.pos == "rel" else None

    def heads(self, x):
        """Queries, keys and values of x (B, T, C), each (B, H, T, hs)."""
        B, T, C = x.shape
        return (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.heads(x)
        dropout = self.dropout if self.training else 0.0
        if cache is None and self.graph == FULL and self.distance_bias is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)  # scale hs^-0.5
        else:
            layout = cache if cache is not None else layout_for(self.graph, T, x.device)
            q, (k, v) = layout.queries(q), layout.keys(k=k, v=v)  # (B, H, n, Q or K, hs)
            mask = layout.bias
            if self.distance_bias is not None:
                mask = mask + self.distance_bias[:, layout.distance]  # (H, n, Q, K)
            y = layout.merge(attention(q, k, v, mask, dropout))  # (B, H, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.ReLU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """Pre-norm residual block: token mixing (graph layer or attention), then the feed-forward net."""

    def __init__(self, cfg, graph):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.mixer = CausalSelfAttention(cfg, graph) if cfg.mixer == "attention" else GraphMixer(cfg, graph)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.ffwd = FeedForward(cfg)

    def forward(self, x, cache=None, last_only=False):
        x = x + self.mixer(self.ln1(x), cache)
        if last_only:
            x = x[:, -1:]  # only the last token's output is wanted: the others skip the feed-forward net
        x = x + self.ffwd(self.ln2(x))
        return x


class GPT(nn.Module):
    """Character-level GPT whose token mixer is a PyG graph layer or self-attention."""

    arch = "gpt"

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.context_size = cfg.block_size
        self.graphs = parse_graph(cfg.graph, cfg.n_layer)  # one per layer
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.position_embedding = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "abs" else None
        self.blocks = nn.Sequential(*[Block(cfg, graph) for graph in self.graphs])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.apply(self._init_weights)
        self.supports_cache = all(
            isinstance(b.mixer, CausalSelfAttention) or b.mixer.dense for b in self.blocks
        )
        # With relative positions and graphs that reach a bounded number of tokens back, the last token's logits
        # depend on at most `reach` tokens before it; absolute positions shift under every token.
        reaches = [g.reach for g in self.graphs]
        self.reach = sum(reaches) if cfg.pos == "rel" and None not in reaches else None

    @staticmethod
    def _init_weights(module):
        # PyG layers keep their own initialisation: their linear maps are not nn.Linear.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None, last_only=False):
        """Logits (B, T, vocab_size) and the loss, or with last_only the last token's logits (B, 1, vocab_size)
        alone, as sampling wants them; with a decoder.KVCache, idx holds the tokens after the cached ones."""
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device) if cache is None else cache.begin(T)
        x = self.token_embedding(idx)  # (B, T, C)
        if self.position_embedding is not None:
            x = x + self.position_embedding(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i], last_only and i == len(self.blocks) - 1)
        if cache is not None:
            cache.advance(T)
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        return logits, lm_loss(logits, targets)


@dataclass
class BigramConfig:
    vocab_size: int = 65


class BigramLanguageModel(nn.Module):
    """Each token reads the logits of the next one from a vocab x vocab table."""

    arch = "bigram"
    supports_cache = False  # it reads one token: the lecture's sampler is all it needs

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.context_size = 1
        self.token_embedding_table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)

    def forward(self, idx, targets=None, last_only=False):
        logits = self.token_embedding_table(idx[:, -1:] if last_only else idx)  # (B, T or 1, vocab_size)
        return logits, lm_loss(logits, targets)


def lm_loss(logits, targets):
    """Mean next-token cross-entropy, or None without targets."""
    if targets is None:
        return None
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


ARCHITECTURES = {"bigram": (BigramLanguageModel, BigramConfig), "gpt": (GPT, GPTConfig)}


def build_model(arch, config):
    """A model of architecture `arch` ("bigram" or "gpt") from a dict of its config fields."""
    model_cls, config_cls = ARCHITECTURES[arch]
    return model_cls(config_cls(**config))


def model_from_checkpoint(checkpoint, **overrides):
    """The model stored in a checkpoint dict (see gnngpt.checkpoint.load_checkpoint), on the CPU in eval mode.

    overrides replace fields of its config that leave the parameters as they are, such as backend.
    """
    model = build_model(checkpoint["arch"], {**checkpoint["model_config"], **overrides})
    model.load_state_dict(checkpoint["model"])
    return model.eval()
