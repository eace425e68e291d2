"""GATConv and GATv2Conv on a context graph, computed as masked dense attention with the PyG layer's own weights.

PyG's per-edge softmax over the incoming edges of node i is a row softmax of scores under the graph's mask.
The keys each query sees are arranged by layout.py (all of them, or bands of chunks) or by the decoder's cache.
GATConv's score is LeakyReLU(att_src . h_j + att_dst . h_i [+ att_edge . lin_edge(e_ij)]), a sum of per-token
terms; GATv2Conv's is att . LeakyReLU(xl_j + xr_i [+ lin_edge(e_ij)]), which needs every (i, j, channel)
triple: a kernel compiled by torch.compile computes it without materialising the (..., Q, K, C) tensor, and
where no compiler is available (and when decoding) it is computed in chunks of queries, recomputed in the
backward pass. The edge feature e_ij is the distance (i - j) / block_size (mixers.distance_features), so its
terms come from a table with one row per distance.
"""
import functools
import logging
import os
import shutil

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .fallback import Acceleration
from .mixers import pyg_nn

CHUNK_ELEMENTS = 1 << 22  # per-chunk budget of the eager GATv2 kernel's (..., chunk, K, C) temporaries


def supports_dense(conv):
    """Whether conv is a GATConv or GATv2Conv in a configuration the dense form computes exactly: with an edge
    feature, that of one number (the distance), which re-added self-loops get as 0.0 (their distance)."""
    if type(conv) is pyg_nn.GATConv and conv.lin is None:  # separate maps for sources and targets
        return False
    if type(conv) not in (pyg_nn.GATConv, pyg_nn.GATv2Conv):
        return False
    return conv.edge_dim is None or (conv.edge_dim == 1 and (not conv.add_self_loops or conv.fill_value == 0.0))


def dense_gat(conv, x, layout, block_size, fused=True):
    """Output of the PyG layer conv for the tokens x (B, T, C_in) on a graph arranged by layout, as (B, T, C_out).

    layout is a layout.DenseLayout or BandedLayout of the graph over the T tokens, or a decoder.LayerCache: then
    x holds only the new tokens, whose per-token terms the cache takes in, and they attend over its slots.
    fused=False keeps GATv2Conv off the compiled kernel (decoding steps of ever new shapes would recompile it).
    """
    B, T, _ = x.shape
    H, C = conv.heads, conv.out_channels

    def heads(t):
        return t.view(B, T, H, C).transpose(1, 2)  # (B, T, H*C) -> (B, H, T, C)

    edges = edge_table(conv, block_size, x.device)  # (D, H) or (D, H, C), or None
    if type(conv) is pyg_nn.GATConv:
        h = heads(conv.lin(x))
        a_src = (h * conv.att_src.view(1, H, 1, C)).sum(-1)  # (B, H, T)
        a_dst = (h * conv.att_dst.view(1, H, 1, C)).sum(-1)
        values, a_src = layout.keys(h=h, a_src=a_src)  # (B, H, n, K, C), (B, H, n, K)
        scores = layout.queries(a_dst).unsqueeze(-1) + a_src.unsqueeze(-2)  # (B, H, n, Q, K): query i, key j
        if edges is not None:
            scores = scores + edges[layout.distance].permute(3, 0, 1, 2)  # (H, n, Q, K)
        scores = F.leaky_relu(scores, conv.negative_slope)
    else:
        xl = heads(conv.lin_l(x))
        xr = xl if conv.share_weights else heads(conv.lin_r(x))
        (values,) = layout.keys(xl=xl)
        scores = gatv2_scores(values, layout.queries(xr), conv.att.view(H, C), conv.negative_slope,
                              edges, layout.distance, fused=fused)
    alpha = F.dropout(F.softmax(scores + layout.bias, dim=-1), p=conv.dropout, training=conv.training)
    out = layout.merge(alpha @ values)  # (B, H, T, C)
    out = out.transpose(1, 2).reshape(B, T, H * C) if conv.concat else out.mean(dim=1)
    if conv.res is not None:
        out = out + conv.res(x)
    if conv.bias is not None:
        out = out + conv.bias
    return out


def edge_table(conv, block_size, device):
    """The edge term of every distance d = 0 .. block_size - 1 (feature d / block_size), or None without one:
    (D, H) for GATConv, att_edge . lin_edge(e); (D, H, C) for GATv2Conv, lin_edge(e)."""
    if conv.lin_edge is None:
        return None
    features = torch.arange(block_size, device=device, dtype=conv.lin_edge.weight.dtype)[:, None] / block_size
    table = conv.lin_edge(features).view(block_size, conv.heads, conv.out_channels)
    if type(conv) is pyg_nn.GATConv:
        return (table * conv.att_edge).sum(-1)
    return table


def gatv2_scores(xl, xr, att, negative_slope, edges=None, distance=None, fused=True):
    """GATv2 scores att . LeakyReLU(xl_j + xr_i + edges[distance_ij]) of queries xr (B, H, n, Q, C) over keys
    xl (B, H, n, K, C); edges (D, H, C) and distance (n, Q, K) are None without an edge term.

    Returns (B, H, n, Q, K). Inside torch.compile, and with fused=True through fused_gatv2_scores where a compiler
    is available, the broadcast sum is fused into one loop; otherwise it is computed in chunks of queries. Where
    the fused kernel raises (compiling it for a new shape, say), FUSED_GATV2 warns once and goes off: the chunked
    kernel, which computes the same scores, runs from then on.
    """
    if torch.compiler.is_compiling():
        return gatv2_scores_expression(xl, xr, att, negative_slope, edges, distance)
    if fused and FUSED_KERNEL and FUSED_GATV2.on:
        try:
            return fused_gatv2_scores()(xl, xr, att, negative_slope, edges, distance)
        except Exception as e:  # whatever compiling or running the kernel raised: the chunked kernel decides
            FUSED_GATV2.fail(e)
    return chunked_gatv2_scores(xl, xr, att, negative_slope, edges, distance)


def gatv2_scores_expression(xl, xr, att, negative_slope, edges=None, distance=None):
    """gatv2_scores written as one broadcast expression: (B, H, n, Q, K, C) in eager mode, fused when compiled."""
    z = xr.unsqueeze(-2) + xl.unsqueeze(-3)  # (B, H, n, Q, K, C)
    if edges is not None:
        z = z + edges.transpose(0, 1)[:, distance]  # (H, n, Q, K, C)
    H = att.size(0)
    return (F.leaky_relu(z, negative_slope) * att.view(H, 1, 1, 1, -1)).sum(-1)


def chunked_gatv2_scores(xl, xr, att, negative_slope, edges=None, distance=None):
    """gatv2_scores_expression over chunks of queries, each recomputed in the backward pass (bounded memory)."""
    B, H, n, Q, C = xr.shape
    step = max(1, CHUNK_ELEMENTS // (B * H * n * xl.size(3) * C))
    chunks = []
    for q0 in range(0, Q, step):
        part = None if distance is None else distance[:, q0:q0 + step]
        chunks.append(recomputed(gatv2_scores_expression, xl, xr[:, :, :, q0:q0 + step], att, negative_slope,
                                 edges, part))
    return torch.cat(chunks, dim=3)


def recomputed(function, *args):
    """function(*args); with gradients on, its intermediates are recomputed in the backward pass, not kept."""
    return checkpoint(function, *args, use_reentrant=False) if torch.is_grad_enabled() else function(*args)


def compiler_available():
    """Whether torch.compile can build CPU kernels here: it needs a C++ compiler."""
    return any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "c++"), "g++", "clang++"))


@functools.cache
def fused_gatv2_scores():
    """gatv2_scores_expression compiled by torch.compile, built on first use (importing the compiler takes seconds)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU machines
    return torch.compile(gatv2_scores_expression)


FUSED_KERNEL = compiler_available()  # whether GATv2Conv's scores use the compiled kernel outside torch.compile
FUSED_GATV2 = Acceleration("the compiled GATv2 score kernel", "GATv2 scores are computed by the chunked kernel "
                           "(the same scores)")
