"""The graph-attention GPT, the transformer it is compared with, and the bigram baseline."""
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn import functional as F

from .dense_attention import causal_bias, dense_gat, supports_dense
from .graph import causal_edge_index
from .layers import build_conv


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
    backend: str = "fast"  # GATConv/GATv2Conv: "fast" (dense masked attention) or "pyg" (message passing)

    @classmethod
    def from_settings(cls, settings, vocab_size, **fields):
        """The model sizes of a training-settings dict (as in gnngpt.config.PRESETS), with other fields given."""
        sizes = {k: settings[k] for k in ("block_size", "n_embd", "n_head", "n_layer", "dropout")}
        return cls(vocab_size=vocab_size, **sizes, **fields)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention as in the lecture model, computed with scaled_dot_product_attention."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def heads(self, x):
        """Queries, keys and values of x (B, T, C), each (B, H, T, hs)."""
        B, T, C = x.shape
        return (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = self.heads(x)
        if cache is not None:
            k, v = cache.extend(k=k, v=v)  # (B, H, capacity, hs)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=None if cache is None else cache.bias.to(q.dtype),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=cache is None and T > 1,
        )  # scale hs^-0.5
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))


class GraphMixer(nn.Module):
    """A PyG convolution on the batched causal graph of the tokens, then dropout.

    With the fast backend, GATConv and GATv2Conv run as masked dense attention with the same parameters.
    """

    def __init__(self, cfg):
        super().__init__()
        self.conv = build_conv(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.dense = cfg.backend == "fast" and supports_dense(self.conv)

    def forward(self, x, cache=None):
        if self.dense:
            return self.dropout(dense_gat(self.conv, x, cache))
        if cache is not None:
            raise ValueError("only the fast backend of GATConv and GATv2Conv decodes with a cache")
        B, T, C = x.shape
        edge_index = causal_edge_index(B, T, x.device)
        y = self.conv(x.reshape(B * T, C), edge_index)  # (B*T, C)
        return self.dropout(y.view(B, T, C))


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
    """Pre-norm residual block: token mixing (attention or graph layer), then the feed-forward net."""

    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.mixer = CausalSelfAttention(cfg) if cfg.mixer == "attention" else GraphMixer(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.ffwd = FeedForward(cfg)

    def forward(self, x, cache=None):
        x = x + self.mixer(self.ln1(x), cache)
        x = x + self.ffwd(self.ln2(x))
        return x


class GPT(nn.Module):
    """Character-level GPT whose token mixer is self-attention or a PyG graph layer."""

    arch = "gpt"

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.context_size = cfg.block_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.position_embedding = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)
        self.apply(self._init_weights)
        self.supports_cache = all(
            isinstance(b.mixer, CausalSelfAttention) or b.mixer.dense for b in self.blocks
        )

    @staticmethod
    def _init_weights(module):
        # PyG layers keep their own initialisation: their linear maps are not nn.Linear.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, cache=None):
        """Logits (B, T, vocab_size) and the loss; with a KVCache, idx holds the tokens after the cached ones."""
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device) if cache is None else cache.begin(T)
        x = self.token_embedding(idx) + self.position_embedding(pos)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(T)
        x = self.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        return logits, lm_loss(logits, targets)


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


@dataclass
class BigramConfig:
    vocab_size: int = 65


class BigramLanguageModel(nn.Module):
    """Each token reads the logits of the next one from a vocab x vocab table."""

    arch = "bigram"

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.context_size = 1
        self.token_embedding_table = nn.Embedding(cfg.vocab_size, cfg.vocab_size)

    def forward(self, idx, targets=None):
        logits = self.token_embedding_table(idx)  # (B, T, vocab_size)
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


def model_from_checkpoint(checkpoint, device="cpu", **overrides):
    """The model stored in a checkpoint dict (see gnngpt.checkpoint.load_checkpoint), in eval mode.

    overrides replace fields of its config that leave the parameters as they are, such as backend.
    """
    model = build_model(checkpoint["arch"], {**checkpoint["model_config"], **overrides})
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval()
