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
import contextlib
import functools
import logging
import os
import shutil
import sys

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .errors import Failure, one_line
from .fallback import Acceleration
from .mixers import pyg_nn

NO_DENSE_FORM = "no dense form"  # the dense_refusal of a layer the fast backend never computes
CHUNK_ELEMENTS = 1 << 22  # per-chunk budget of the eager GATv2 kernel's (..., chunk, K, C) temporaries


def gat_refusal(conv):
    """Why the dense form cannot compute conv exactly, or "" when it can: a GATConv or GATv2Conv that passes and
    sums its messages as the dense form does (propagation_refusal), with an edge feature only if that is one
    number (the distance), which re-added self-loops get as 0.0 (their distance)."""
    name = type(conv).__name__
    if type(conv) not in (pyg_nn().GATConv, pyg_nn().GATv2Conv):
        return NO_DENSE_FORM
    if refusal := propagation_refusal(conv):
        return refusal
    if type(conv) is pyg_nn().GATConv and conv.lin is None:
        return "GATConv with separate maps for sources and targets"
    if conv.edge_dim not in (None, 1):
        return f"{name} with edge_dim={conv.edge_dim} (the dense form reads one feature, the distance)"
    if conv.edge_dim == 1 and conv.add_self_loops and conv.fill_value != 0.0:
        return f"{name} with fill_value={conv.fill_value!r} (self-loops re-added with a feature other than distance 0)"
    return ""


def propagation_refusal(conv):
    """Why conv's message passing is not what every dense form computes, or "" when it is: messages from each
    edge's source to its target (flow "source_to_target"), summed at the target (aggr "add" or "sum")."""
    name = type(conv).__name__
    if not isinstance(conv.aggr_module, pyg_nn().aggr.SumAggregation):
        return f"{name} with aggr={conv.aggr!r} (the dense form sums, as aggr='add')"
    if conv.flow != "source_to_target":
        return f"{name} with flow={conv.flow!r} (the dense form passes messages from source to target)"
    return ""


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

    edges = edge_table(conv, block_size, max(T, block_size), x.device)  # (D, H) or (D, H, C), or None
    if is_gatconv(conv):
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


def is_gatconv(conv):
    """Whether conv, a layer gat_refusal accepts, is PyG's GATConv (else its GATv2Conv), told by the class's name:
    torch.compile reads that as a constant, where it would trace the first import of PyG (mixers.pyg_nn)."""
    return type(conv).__name__ == "GATConv"


def distance_table(conv, block_size, D, device):
    """lin_edge of every distance d = 0 .. D - 1 (feature d / block_size): (D, H, C). D is block_size, or the
    length of a longer input, whose distances past block_size PyG's layer reads all the same."""
    features = torch.arange(D, device=device, dtype=conv.lin_edge.weight.dtype)[:, None] / block_size
    return conv.lin_edge(features).view(D, conv.heads, conv.out_channels)


def edge_table(conv, block_size, D, device):
    """The edge term of every distance d = 0 .. D - 1 (distance_table), or None without one: (D, H) for GATConv,
    att_edge . lin_edge(e); (D, H, C) for GATv2Conv, lin_edge(e)."""
    if conv.lin_edge is None:
        return None
    table = distance_table(conv, block_size, D, device)
    if is_gatconv(conv):
        return (table * conv.att_edge).sum(-1)
    return table


def gatv2_scores(xl, xr, att, negative_slope, edges=None, distance=None, fused=True):
    """GATv2 scores att . LeakyReLU(xl_j + xr_i + edges[distance_ij]) of queries xr (B, H, n, Q, C) over keys
    xl (B, H, n, K, C); edges (D, H, C) and distance (n, Q, K) are None without an edge term.

    Returns (B, H, n, Q, K). With fused=True through the compiled kernels where a compiler is available, the
    broadcast sum is fused into loops that never hold the (B, H, n, Q, K, C) tensor; otherwise it is computed in
    chunks of queries. Inside a model compiled whole (--compile), the expression is traced into the model's graph
    and the compiler fuses it as it sees fit. With an edge term, the fused path is FusedEdgeScores: its
    backward pass is three compiled reductions. Where a compiled kernel raises (compiling it for
    a new shape, say), the chunked kernel, which computes the same scores, runs instead; once it has, FUSED_GATV2
    warns once and goes off for the rest of the process (an input the chunked kernel refuses too leaves it on)."""
    if torch.compiler.is_compiling():
        return chunk_scores(xl, xr, att, negative_slope, edges, distance)
    def chunked():
        return chunked_gatv2_scores(xl, xr, att, negative_slope, edges, distance)

    if fused and FUSED_KERNEL and FUSED_GATV2.on:
        try:
            if edges is None:
                return fused_gatv2_scores()(xl, xr, att, negative_slope)
            return FusedEdgeScores.apply(xl, xr, att, edges, distance, negative_slope)
        except Exception as e:  # whatever compiling or running the kernel raised: the chunked kernel decides
            return FUSED_GATV2.portable(e, chunked)
    return chunked()


def edges_by_pair(edges, distance):
    """The edge term of each (query, key) pair, edges[distance] as a contiguous (H, n, Q, K, C), by index_select
    (whose gradient is an index_add of whole rows of the table, not a scatter of single elements)."""
    D, H, C = edges.shape
    return edges.transpose(0, 1).contiguous().index_select(1, distance.reshape(-1)).view(H, *distance.shape, C)


def gatv2_scores_expression(xl, xr, att, negative_slope, edge_term=None):
    """gatv2_scores written as one broadcast expression: (B, H, n, Q, K, C) in eager mode, fused when compiled;
    edge_term (H, n, Q, K, C), or None."""
    z = xr.unsqueeze(-2) + xl.unsqueeze(-3)  # (B, H, n, Q, K, C)
    if edge_term is not None:
        z = z + edge_term
    H = att.size(0)
    return (F.leaky_relu(z, negative_slope) * att.view(H, 1, 1, 1, -1)).sum(-1)


def chunked_gatv2_scores(xl, xr, att, negative_slope, edges=None, distance=None):
    """gatv2_scores_expression over chunks of queries, each (its edge terms looked up too) recomputed in the
    backward pass: bounded memory."""
    B, H, n, Q, C = xr.shape
    step = max(1, CHUNK_ELEMENTS // (B * H * n * xl.size(3) * C))
    chunks = []
    for q0 in range(0, Q, step):
        part = None if distance is None else distance[:, q0:q0 + step]
        chunks.append(recomputed(chunk_scores, xl, xr[:, :, :, q0:q0 + step], att, negative_slope, edges, part))
    return torch.cat(chunks, dim=3)


def chunk_scores(xl, xr, att, negative_slope, edges, distance):
    edge_term = None if edges is None else edges_by_pair(edges, distance)
    return gatv2_scores_expression(xl, xr, att, negative_slope, edge_term)


class FusedEdgeScores(torch.autograd.Function):
    """gatv2_scores_expression with an edge term, forward and backward by compiled kernels (fused_edge_kernels).

    Compiled as one function, its backward pass would hold the gradient of the whole (B, H, n, Q, K, C) sum: it
    has three reductions over different dimensions (keys for the queries, queries for the keys, the batch for the
    edge term), and the compiler keeps what they share. Here each reduction is a kernel of its own that computes
    the sum again as it reduces, as the forward pass does: the keys' gradient is the queries' with the roles of
    queries and keys swapped, so that both reduce over the dimension next to the channels. The edge term of each
    pair is looked up again in the backward pass rather than kept, and its gradient summed into the table's rows.
    """

    @staticmethod
    def forward(ctx, xl, xr, att, edges, distance, negative_slope):
        ctx.save_for_backward(xl, xr, att, edges, distance)
        ctx.negative_slope = negative_slope
        return fused_gatv2_scores()(xl, xr, att, negative_slope, edges_by_pair(edges, distance))

    @staticmethod
    def backward(ctx, grad):
        xl, xr, att, edges, distance = ctx.saved_tensors

        def chunked():  # the chunked kernel's gradients, by autograd
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_() for t in (xl, xr, att, edges)]
                scores = chunked_gatv2_scores(*inputs[:3], ctx.negative_slope, inputs[3], distance)
                return (*torch.autograd.grad(scores, inputs, grad), None, None)

        if FUSED_GATV2.on:
            try:
                return (*fused_edge_gradients(xl, xr, att, edges, distance, ctx.negative_slope, grad), None, None)
            except Exception as e:  # whatever compiling or running a kernel raised: the chunked kernel decides
                return FUSED_GATV2.portable(e, chunked)
        return chunked()


def fused_edge_gradients(xl, xr, att, edges, distance, negative_slope, grad):
    """The gradients of FusedEdgeScores for xl, xr, att and edges, by the compiled reductions."""
    kernels = fused_edge_kernels()
    edge_term = edges_by_pair(edges, distance)
    grad_queries, att_terms = kernels["queries and att"](xl, xr, att, edge_term, negative_slope, grad)
    swapped = edges_by_pair(edges, distance.transpose(-1, -2))  # (H, n, K, Q, C)
    grad_keys = kernels["queries"](xr, xl, att, swapped, negative_slope, grad.transpose(-1, -2).contiguous())
    by_pair = kernels["edges"](xl, xr, att, edge_term, negative_slope, grad)  # (H, n, Q, K, C)
    D, H, C = edges.shape
    grad_edges = by_pair.new_zeros(H, D, C).index_add_(1, distance.reshape(-1), by_pair.view(H, -1, C))
    return grad_keys, grad_queries, att_terms.sum((0, 2, 3)), grad_edges.transpose(0, 1)


def score_gradient(xl, xr, att, edge_term, negative_slope, grad):
    """The gradient of the scores' sum z = xr_i + xl_j + edge_ij (B, H, n, Q, K, C) for the scores' gradient
    grad (B, H, n, Q, K), and grad times LeakyReLU(z), whose sum is the gradient of att."""
    z = xr.unsqueeze(-2) + xl.unsqueeze(-3) + edge_term
    slope = torch.where(z > 0, z.new_ones(()), z.new_full((), negative_slope))  # LeakyReLU's derivative, as
    # autograd takes it at 0, in z's dtype (two Python numbers would give the default dtype's 0.2000000030)
    grad = grad.unsqueeze(-1)
    return grad * att.view(att.size(0), 1, 1, 1, -1) * slope, grad * z * slope


def queries_gradient(*args):
    return score_gradient(*args)[0].sum(-2)  # over the keys: (B, H, n, Q, C)


def queries_and_att_gradient(*args):
    """The queries' gradient and the att gradient's terms, each summed over the keys, in one loop."""
    grad_z, att_terms = score_gradient(*args)
    return grad_z.sum(-2), att_terms.sum(-2)


def edges_gradient(*args):
    return score_gradient(*args)[0].sum(0)  # over the batch: (H, n, Q, K, C)


@functools.cache
def fused_edge_kernels():
    """FusedEdgeScores' backward kernels, compiled by torch.compile on first use (its forward pass is
    fused_gatv2_scores)."""
    return {name: compiled(function) for name, function in (
        ("queries", queries_gradient), ("queries and att", queries_and_att_gradient), ("edges", edges_gradient))}


def recomputed(function, *args):
    """function(*args); with gradients on, its intermediates are recomputed in the backward pass, not kept."""
    return checkpoint(function, *args, use_reentrant=False) if torch.is_grad_enabled() else function(*args)


def compiler_available():
    """Whether torch.compile can build CPU kernels here: it needs the C++ compiler its inductor runs, $CXX or else
    g++ (clang++ on macOS), and tries no other."""
    command = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++").split()
    return bool(command) and shutil.which(command[0]) is not None


@functools.cache
def fused_gatv2_scores():
    """gatv2_scores_expression compiled by torch.compile, built on first use (importing the compiler takes seconds)."""
    return compiled(gatv2_scores_expression)


def compiled(function, **options):
    """function compiled by torch.compile(**options), or a module compiled in place (its state_dict keys, and so
    its checkpoints, stay the same), without the "No CUDA runtime" warning on CPU machines."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if isinstance(function, torch.nn.Module):
        function.compile(**options)
        return function
    return torch.compile(function, **options)


def compile_failure(error, what):
    """"torch.compile could not compile what (its compiler's error)" where error is torch.compile failing to build
    kernels (inductor's C++ or Triton compile), else ""."""
    dynamo = sys.modules.get("torch._dynamo.exc")  # imported by any compiling
    if dynamo is None or not isinstance(error, dynamo.BackendCompilerFailed):
        return ""
    cause = error.inner_exception
    return f"torch.compile could not compile {what} ({type(cause).__name__}: {one_line(cause)[:160]})"


@contextlib.contextmanager
def compile_failures(compiling, what, fix):
    """With compiling (--compile), torch.compile failing to build what's kernels inside becomes one Failure line:
    compile_failure's, then fix() (called then, when what is on disk says how to go on)."""
    try:
        yield
    except Exception as e:
        failure = compile_failure(e, what) if compiling else ""
        if not failure:
            raise
        raise Failure(f"{failure}; {fix()}") from None


FUSED_KERNEL = compiler_available()  # whether GATv2Conv's scores use the compiled kernel outside torch.compile
FUSED_GATV2 = Acceleration("the compiled GATv2 score kernel", "GATv2 scores are computed by the chunked kernel "
                           "(the same scores)")
