"""PyG's TransformerConv on a context graph, computed as masked dense attention with the layer's own weights.

TransformerConv scores each edge j -> i by the scaled dot product of query i and key j and takes the softmax over
the incoming edges of i: on the keys a layout arranges (layout.py, or the decoder's cache), that is
scaled_dot_product_attention under the graph's mask. With an edge feature e_ij, PyG adds lin_edge(e_ij) to key j
and to value j (relative attention in the manner of Shaw et al.). The feature is the distance (i - j) /
block_size (mixers.distance_features), so lin_edge gives a table E with one row per distance d, and

    score_ij = q_i . (k_j + E[d_ij]) / sqrt(C) = (q_i . k_j + (q_i . E)[d_ij]) / sqrt(C)
    out_i    = sum_j alpha_ij (v_j + E[d_ij]) = (alpha @ v)_i + sum_d (sum of alpha_ij over j at distance d) E[d]

so no tensor grows with (query, key, channel): the queries meet the table once and the attention weights are
summed by distance, as skewed matrix products on the layout's band of keys (layout.distance_scores, distance_sum).
"""
import math

import torch
from torch.nn import functional as F

from .fast_gat import NO_DENSE_FORM, distance_table, propagation_refusal
from .layout import attention, distance_scores, distance_sum
from .mixers import pyg_nn


def transformer_refusal(mixer):
    """Why the dense form cannot compute the mixer (a TokenMixer) exactly, or "" when it can: a TransformerConv
    that passes and sums its messages as the dense form does (propagation_refusal), reading its edges' distances
    or nothing (the one feature a TokenMixer gives an edge_dim layer)."""
    if type(mixer.conv) is not pyg_nn().TransformerConv:
        return NO_DENSE_FORM
    return propagation_refusal(mixer.conv)


def dense_transformer(mixer, x, layout, block_size, causal=False):
    """Output of the mixer (a TokenMixer around a TransformerConv) for the tokens x (B, T, n_embd) on a graph
    arranged by layout, as (B, T, n_embd); layout may be a decoder.LayerCache (x then holds the new tokens).
    causal: the graph is the complete causal one, whose mask scaled_dot_product_attention applies itself."""
    conv = mixer.conv
    B, T, _ = x.shape
    H, C = conv.heads, conv.out_channels

    def heads(t):
        return t.view(B, T, H, C).transpose(1, 2)  # (B, T, H*C) -> (B, H, T, C)

    query, key, value, x_r = projections(conv, x)
    q = layout.queries(heads(query))  # (B, H, n, Q, C)
    k, v = layout.keys(k=heads(key), v=heads(value))  # (B, H, n, K, C)
    dropout = conv.dropout if conv.training else 0.0
    if conv.lin_edge is None:
        out = attention(q, k, v, None if causal else layout.bias, dropout)
    else:
        table = distance_table(conv, block_size, max(T, block_size), x.device).transpose(0, 1)  # (H, D, C)
        q = q / math.sqrt(C)  # scaled once, not the (..., Q, K) scores
        scores = q @ k.transpose(-1, -2) + distance_scores(q, table, layout) + layout.bias
        alpha = F.dropout(F.softmax(scores, dim=-1), p=dropout, training=dropout > 0)
        out = alpha @ v + distance_sum(alpha, table, layout)
    out = layout.merge(out)  # (B, H, T, C)
    out = out.transpose(1, 2).reshape(B, T, H * C) if conv.concat else out.mean(dim=1)
    if conv.root_weight:
        if conv.lin_beta is not None:
            beta = conv.lin_beta(torch.cat([out, x_r, out - x_r], dim=-1)).sigmoid()
            out = beta * x_r + (1 - beta) * out
        else:
            out = out + x_r
    return out if mixer.proj is None else mixer.proj(out)


def projections(conv, x):
    """lin_query, lin_key, lin_value and lin_skip of x (None without root_weight) by one matrix product with
    their weights stacked: one product of 3 or 4 times the width runs faster than as many narrow ones."""
    linears = [conv.lin_query, conv.lin_key, conv.lin_value] + ([conv.lin_skip] if conv.root_weight else [])
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.weight.new_zeros(len(lin.weight)) if lin.bias is None else lin.bias for lin in linears])
    parts = F.linear(x, weight, bias).split([len(lin.weight) for lin in linears], dim=-1)
    return (*parts, None) if len(parts) == 3 else parts
