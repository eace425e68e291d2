"""GATConv and GATv2Conv on the causal graph, computed as masked dense attention with the PyG layer's own weights.

On the complete causal graph, node i attends over every j <= i, so PyG's per-edge softmax is a row softmax of
a (T, T) score matrix under a causal mask. GATConv's score is LeakyReLU(att_src . h_j + att_dst . h_i), a sum
of two per-token terms. GATv2Conv's is att . LeakyReLU(xl_j + xr_i), which needs every (i, j, channel)
triple: a kernel compiled by torch.compile computes it without materialising the B x H x T x T x C tensor,
and where no compiler is available GATv2Score computes it in chunks of queries and recomputes them in the
backward pass.
"""
import logging
import os
import shutil

import torch
from torch.nn import functional as F

from .graph import causal_bias
from .mixers import pyg_nn

CHUNK_ELEMENTS = 1 << 22  # per-chunk budget of GATv2Score's (B, H, chunk, T, C) temporaries


def supports_dense(conv):
    """Whether conv is a GATConv or GATv2Conv in a configuration the dense form computes exactly."""
    if type(conv) is pyg_nn.GATConv:
        return conv.lin is not None and conv.edge_dim is None
    if type(conv) is pyg_nn.GATv2Conv:
        return conv.edge_dim is None
    return False


def dense_gat(conv, x, cache=None):
    """Output of the PyG layer conv for the tokens x (B, T, C_in) on the causal graph, as (B, T, C_out).

    With a cache (a decoder.LayerCache), x holds only the new tokens: their per-token terms are written into the
    cache, and the queries attend over the cached terms of every token so far, so each new token costs work
    linear in the context.
    """
    B, T, _ = x.shape
    H, C = conv.heads, conv.out_channels
    def heads(t):
        return t.view(B, T, H, C).transpose(1, 2)  # (B, T, H*C) -> (B, H, T, C)
    if type(conv) is pyg_nn.GATConv:
        h = heads(conv.lin(x))
        a_src = (h * conv.att_src.view(1, H, 1, C)).sum(-1)  # (B, H, T)
        a_dst = (h * conv.att_dst.view(1, H, 1, C)).sum(-1)
        if cache is not None:
            h, a_src = cache.extend(h=h, a_src=a_src)
        scores = a_dst.unsqueeze(-1) + a_src.unsqueeze(-2)  # (B, H, T, S): query i, key j
        scores = F.leaky_relu(scores, conv.negative_slope)
        values = h
    else:
        xl = heads(conv.lin_l(x))
        xr = xl if conv.share_weights else heads(conv.lin_r(x))
        if cache is not None:
            (xl,) = cache.extend(xl=xl)
        # decoding with a cache runs the chunked kernel: prefills of each length would recompile the fused one
        scores = gatv2_scores(xl, xr, conv.att.view(H, C), conv.negative_slope, fused=cache is None)  # (B, H, T, S)
        values = xl
    if cache is not None:
        scores = scores + cache.bias
    elif T > 1:
        scores = scores + causal_bias(T, x.device, scores.dtype)
    alpha = F.dropout(F.softmax(scores, dim=-1), p=conv.dropout, training=conv.training)
    out = alpha @ values  # (B, H, T, C)
    out = out.transpose(1, 2).reshape(B, T, H * C) if conv.concat else out.mean(dim=1)
    if conv.res is not None:
        out = out + conv.res(x)
    if conv.bias is not None:
        out = out + conv.bias
    return out


def gatv2_scores(xl, xr, att, negative_slope, fused=True):
    """GATv2 scores att . LeakyReLU(xl_j + xr_i) of queries xr (B, H, T, C) over keys xl (B, H, S, C).

    Query i sees no key after S - T + i (it is that key without a cache, and comes earlier in a cache's buffers).
    Returns (B, H, T, S); entries where a query does not see the key are unspecified (the caller masks them).
    Inside torch.compile, and with fused=True through fused_gatv2_scores where a compiler is available, the
    broadcast sum is fused into one loop; otherwise GATv2Score computes it in chunks.
    """
    if torch.compiler.is_compiling():
        return gatv2_scores_expression(xl, xr, att, negative_slope)
    if fused and fused_gatv2_scores is not None:
        return fused_gatv2_scores(xl, xr, att, negative_slope)
    return GATv2Score.apply(xl, xr, att, negative_slope)


def gatv2_scores_expression(xl, xr, att, negative_slope):
    """gatv2_scores written as one broadcast expression: (B, H, T, S, C) in eager mode, fused when compiled."""
    return (F.leaky_relu(xr.unsqueeze(3) + xl.unsqueeze(2), negative_slope) * att[:, None, None, :]).sum(-1)


def compiler_available():
    """Whether torch.compile can build CPU kernels here: it needs a C++ compiler."""
    return any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "c++"), "g++", "clang++"))


logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU machines
fused_gatv2_scores = torch.compile(gatv2_scores_expression) if compiler_available() else None


class GATv2Score(torch.autograd.Function):
    """gatv2_scores in chunks of queries, each over the keys up to its last query; backward recomputes them."""

    @staticmethod
    def forward(ctx, xl, xr, att, negative_slope):
        ctx.save_for_backward(xl, xr, att)
        ctx.negative_slope = negative_slope
        B, H, T, C = xr.shape
        S = xl.size(2)
        scores = xr.new_zeros(B, H, T, S)
        for q0, q1, k1 in query_chunks(xl, xr):
            z = F.leaky_relu(xr[:, :, q0:q1, None] + xl[:, :, None, :k1], negative_slope)  # (B, H, q, k, C)
            scores[:, :, q0:q1, :k1] = (z @ att.view(1, H, 1, C, 1)).squeeze(-1)
        return scores

    @staticmethod
    def backward(ctx, grad_scores):
        xl, xr, att = ctx.saved_tensors
        slope = ctx.negative_slope
        H, C = att.shape
        grad_xl, grad_xr, grad_att = torch.zeros_like(xl), torch.zeros_like(xr), torch.zeros_like(att)
        for q0, q1, k1 in query_chunks(xl, xr):
            z = xr[:, :, q0:q1, None] + xl[:, :, None, :k1]  # (B, H, q, k, C)
            g = grad_scores[:, :, q0:q1, :k1, None]  # (B, H, q, k, 1)
            grad_att += (F.leaky_relu(z, slope) * g).sum((0, 2, 3))
            grad_z = torch.where(z > 0, g, g * slope) * att.view(1, H, 1, 1, C)
            grad_xr[:, :, q0:q1] += grad_z.sum(3)
            grad_xl[:, :, :k1] += grad_z.sum(2)
        return grad_xl, grad_xr, grad_att, None


def query_chunks(xl, xr):
    """(first query, end query, end key) of each chunk; query i sees no key after S - T + i."""
    B, H, T, C = xr.shape
    S = xl.size(2)
    step = max(1, CHUNK_ELEMENTS // (B * H * S * C))
    return [(q0, min(q0 + step, T), S - T + min(q0 + step, T)) for q0 in range(0, T, step)]
