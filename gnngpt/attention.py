"""Attention maps: how much each token attends to every earlier token, per layer and head."""
import torch
from torch.nn import functional as F

from .errors import UsageError
from .mixers import DENSE_LAYERS, TokenMixer, run_conv
from .models import CausalSelfAttention


def has_attention(model):
    """Whether every block of model mixes tokens with softmax attention that can be drawn."""
    blocks = getattr(model, "blocks", None)
    return bool(blocks) and all(
        isinstance(b.mixer, CausalSelfAttention) or type(attention_layer(b.mixer)).__name__ in DENSE_LAYERS
        for b in blocks
    )


def attention_layer(mixer):
    """The PyG layer of a GraphMixer (unwrapped from its TokenMixer), or None for another mixer."""
    conv = getattr(mixer, "conv", None)
    return conv.conv if isinstance(conv, TokenMixer) else conv


@torch.no_grad()
def attention_maps(model, idx):
    """Attention weights of every layer over the tokens idx (B, T): a list of (B, H, T, T), rows are queries.

    Each mixer's input (the LayerNorm'd residual stream) is captured during the model's own forward pass,
    in eval mode, and the mixer's attention weights are computed from it.
    """
    if not has_attention(model):
        raise UsageError(
            f"a {getattr(model.config, 'mixer', model.arch)} model has no attention weights "
            f"to draw; use a run of gpt.py or of pyg-gpt.py with {', '.join(DENSE_LAYERS[:-1])} or {DENSE_LAYERS[-1]}"
        )
    if idx.size(1) > model.context_size:
        raise UsageError(
            f"the prompt has {idx.size(1)} characters, more than the model's context of {model.context_size}; "
            f"use a shorter prompt"
        )
    inputs = []
    hooks = [b.mixer.register_forward_hook(lambda mixer, args, out: inputs.append(args[0])) for b in model.blocks]
    was_training = model.training
    model.eval()
    try:
        model(idx)
        return [mixer_attention(b.mixer, x) for b, x in zip(model.blocks, inputs)]
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()


def mixer_attention(mixer, x):
    """The attention weights (B, H, T, T) of one token mixer on its input x (B, T, C)."""
    if isinstance(mixer, CausalSelfAttention):
        return self_attention_weights(mixer, x)
    return graph_attention_weights(mixer, x)


def self_attention_weights(attn, x):
    """softmax(q k^T * hs^-0.5 [+ distance bias]) over each query's edges, for each head of a CausalSelfAttention."""
    T = x.size(1)
    q, k, _ = attn.heads(x)  # (B, H, T, hs)
    scores = q @ k.transpose(-2, -1) * k.size(-1) ** -0.5 + attn.graph.bias(T, x.device, q.dtype)  # (B, H, T, T)
    if attn.distance_bias is not None:
        i, j = torch.arange(T, device=x.device)[:, None], torch.arange(T, device=x.device)[None, :]
        scores = scores + attn.distance_bias[:, (i - j).clamp(min=0)]
    return F.softmax(scores, dim=-1)


def graph_attention_weights(mixer, x):
    """The per-edge attention of a GraphMixer's PyG layer on its graph, scattered into (B, H, T, T)."""
    B, T, C = x.shape
    _, (edge_index, alpha) = run_conv(attention_layer(mixer), x.reshape(B * T, C),
                                      mixer.graph.edge_index(B, T, x.device), mixer.block_size,
                                      return_attention_weights=True)
    alpha = alpha.view(edge_index.size(1), -1)  # (E, H)
    src, dst = edge_index  # the layer's own edges: its self-loops replace the graph's
    maps = x.new_zeros(B, T, T, alpha.size(1))
    maps[dst // T, dst % T, src % T] = alpha
    return maps.permute(0, 3, 1, 2)  # (B, H, T, T)


def rank_agreement(maps, edges=None, tol=1e-6):
    """Per head of maps (H, T, T): the share of key pairs that each query orders as the last query does.

    edges (T, T) bool marks the keys each query sees (default: the complete causal graph); only pairs of keys
    that both the query and the last query see count. Static attention (GATv1) ranks keys the same way for every
    query, so it scores 1; dynamic attention (GATv2, dot-product) can score less. Differences below tol count as
    ties, which always agree.
    """
    H, T, _ = maps.shape
    edges = (torch.ones(T, T, dtype=torch.bool).tril() if edges is None else edges).to(maps.device)
    diff = maps[:, :, :, None] - maps[:, :, None, :]  # (H, query, key j, key k)
    order = torch.where(diff.abs() > tol, diff.sign(), torch.zeros_like(diff))
    discordant = order * order[:, -1:] < 0  # against the last query
    seen = edges & edges[-1:]  # (query, key): keys that the query and the last query both see
    j, k = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    pairs = seen[:, :, None] & seen[:, None, :] & (j < k).to(maps.device)  # (query, key j, key k)
    pairs[-1] = False  # the last query agrees with itself
    if not pairs.any():
        return torch.ones(H)
    return 1 - (discordant & pairs).sum(dim=(1, 2, 3)) / pairs.sum()
