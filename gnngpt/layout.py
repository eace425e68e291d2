"""Which keys each query attends to on a context graph, arranged for dense tensor code.

Attention on a graph is a softmax over each token's incoming edges. Dense code computes it for n blocks of Q
queries at once, each block against K keys, with an additive mask that keeps the edges: tensors of shape
(B, H, n, Q, ...) for the queries and (B, H, n, K, ...) for the keys. Two arrangements:

- DenseLayout: one block of all T queries against all T keys, masked by the graph: T x T work, right for the
  complete causal graph and for graphs whose edges grow with T (strided).
- BandedLayout: for graphs whose edges reach at most R tokens back (window, dilated; sink graphs beyond their
  G sinks), chunks of Q queries against the R keys before them, their own Q and the G sinks: work and memory
  that grow with T * (G + Q + R), not T * T.

A decoder.LayerCache is the third arrangement: the new tokens against the slots of the cache.

Each arrangement gives the distance i - j of every (query, key) pair, and band_start: the keys from that column on
lie at distance i - j + K' - Q from query i (K' of them), the same for every block, so that a term indexed by
distance is a skewed matrix product there (distance_scores, distance_sum). The keys before it reach rows of a
table by distance that rows_reached names.
"""
import torch
from torch.nn import functional as F

from .graph import eager_cache

MIN_CHUNK = 32  # queries per chunk of a BandedLayout, at least: fewer would spend more on overhead than they save


def layout_for(graph, T, device):
    """The cheaper arrangement of graph over T tokens (cached: treat its tensors as read-only)."""
    return cached_layout(graph, T, torch.device(device))


@eager_cache(maxsize=64)
def cached_layout(graph, T, device):
    if graph.window is not None:
        chunk = max(MIN_CHUNK, graph.window + 1)
        if graph.sinks + chunk + graph.window < T:
            return BandedLayout(graph, T, chunk, device)
    return DenseLayout(graph, T, device)


class DenseLayout:
    """All T queries against all T keys, with the graph's (T, T) mask."""

    def __init__(self, graph, T, device):
        i = torch.arange(T, device=device)[:, None]
        j = torch.arange(T, device=device)[None, :]
        self.edge = graph.connects(i, j)[None]  # (1, T, T)
        self.bias = graph.bias(T, device)[None]
        self.distance = torch.where(self.edge, i - j, 0)  # (1, T, T)
        self.band_start = 0

    def queries(self, t):
        return t.unsqueeze(2)  # (B, H, 1, T, ...)

    def keys(self, **terms):
        return [t.unsqueeze(2) for t in terms.values()]  # (B, H, 1, T, ...) each

    def merge(self, out):
        return out.squeeze(2)  # (B, H, T, C)


class BandedLayout:
    """Chunks of Q queries, each against its G sinks and the keys from R before its first query to its last.

    Chunk c holds queries cQ .. cQ+Q-1 and the band of keys cQ-R .. cQ+Q-1 (those before 0 are padding), after
    the sink keys 0 .. G-1; band keys below G are masked, since the sinks already hold them. The last chunk is
    padded with queries past T that see only themselves, so that no softmax row is empty.
    """

    def __init__(self, graph, T, chunk, device):
        self.T, self.Q, self.R, self.G = T, chunk, graph.window, graph.sinks
        self.n = -(-T // chunk)
        self.padded = self.n * chunk
        c = torch.arange(self.n, device=device)[:, None, None]
        a = torch.arange(chunk, device=device)[None, :, None]
        i = c * chunk + a  # (n, Q, 1) query positions
        band = c * chunk - self.R + torch.arange(chunk + self.R, device=device)[None, None, :]  # (n, 1, Q+R)
        band_edge = (graph.connects(i, band) & (band >= self.G) & (i < T)) | ((i >= T) & (band == i))
        sinks = torch.arange(self.G, device=device)[None, None, :]  # (1, 1, G)
        sink_edge = graph.connects(i, sinks) & (i < T)
        j = torch.cat((sinks.expand(self.n, 1, -1), band), dim=-1)
        self.edge = torch.cat((sink_edge.expand(-1, chunk, -1), band_edge), dim=-1)  # (n, Q, K)
        self.bias = torch.zeros(self.edge.shape, device=device).masked_fill_(~self.edge, float("-inf"))
        self.distance = torch.where(self.edge, i - j, 0)
        self.band_start = self.G
        self.reached = {}  # rows_reached by table size: built once, as the layout itself is

    def rows_reached(self, D):
        """The rows of a table of D distances that the sinks of each chunk reach, (n, Q + G - 1): from the distance
        of its first query to the last sink on; and the row of each (query, sink) pair among them, (n, Q, G)."""
        if D not in self.reached:
            first = (torch.arange(self.n, device=self.distance.device) * self.Q - self.G + 1).clamp(min=0)[:, None]
            rows = (first + torch.arange(self.Q + self.G - 1, device=first.device)).clamp(max=D - 1)
            self.reached[D] = rows, (self.distance[..., :self.G] - first[..., None]).clamp(min=0)  # masked: row 0
        return self.reached[D]

    def queries(self, t):
        """(B, H, T, ...) -> (B, H, n, Q, ...)"""
        t = pad_tokens(t, 0, self.padded - self.T)
        return t.reshape(*t.shape[:2], self.n, self.Q, *t.shape[3:])

    def keys(self, **terms):
        """Each (B, H, T, ...) -> (B, H, n, G + Q + R, ...): the sinks, then the band of each chunk."""
        out = []
        for t in terms.values():
            band = pad_tokens(t, self.R, self.padded - self.T).unfold(2, self.Q + self.R, self.Q).movedim(-1, 3)
            band = band.contiguous()  # matmul on the overlapping windows of unfold would be slow
            sinks = t[:, :, None, :self.G].expand(-1, -1, self.n, *[-1] * (t.dim() - 2))
            out.append(torch.cat((sinks, band), dim=3) if self.G else band)
        return out

    def merge(self, out):
        """(B, H, n, Q, C) -> (B, H, T, C)"""
        return out.reshape(*out.shape[:2], self.padded, *out.shape[4:])[:, :, :self.T]


def attention(q, k, v, bias, dropout):
    """softmax(q k^T / sqrt(C) + bias) v over arranged blocks (B, H, n, Q or K, C) by scaled_dot_product_attention,
    as 4-D tensors where there is one block of queries (n = 1), which its fused kernels take. bias (..., n, Q, K)
    is a layout's mask, with any per-head terms added; None stands for the causal mask of the complete graph,
    which the kernel applies itself."""
    mask = None if bias is None else bias.to(q.dtype)
    if q.size(2) == 1:
        out = F.scaled_dot_product_attention(q.squeeze(2), k.squeeze(2), v.squeeze(2), dropout_p=dropout,
                                             attn_mask=None if mask is None else mask.squeeze(-3),
                                             is_causal=mask is None)
        return out.unsqueeze(2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)


def distance_scores(q, table, layout):
    """q_i . table[d_ij] for every query i and key j of layout: (B, H, n, Q, K) from the queries (B, H, n, Q, C)
    and a table (H, D, C) with one row per distance.

    On the band (see the module's docstring) it is the product of the queries with the table's rows in falling
    order of distance, skewed: row i shifted left by Q - 1 - i, which is a view of the flat product with one
    zero column appended (the relative shift of Transformer-XL). It then puts masked pairs on values of other
    rows, which the mask discards. Keys before the band take their column of the product with the rows their
    block reaches (layout.rows_reached).
    """
    start, K, Q = layout.band_start, layout.distance.size(-1), q.size(-2)
    parts = []
    if start:
        rows, local = layout.rows_reached(table.size(1))
        product = q @ table[:, rows].transpose(-1, -2)  # (B, H, n, Q, rows)
        parts.append(product.gather(-1, local.expand(*q.shape[:2], *local.shape)))
    if start < K:
        band = K - start
        product = q @ falling(table, band).transpose(-1, -2)  # (B, H, n, Q, band + 1)
        parts.append(product.flatten(-2)[..., Q - 1:Q - 1 + Q * band].unflatten(-1, (Q, band)))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def distance_sum(alpha, table, layout):
    """sum_j alpha_ij table[d_ij] for every query i of layout: (B, H, n, Q, C) from weights alpha (B, H, n, Q, K)
    that are zero on masked pairs, and a table (H, D, C) with one row per distance.

    On the band it undoes distance_scores' skew: the flat weights, padded by Q - 1 zeros before and one after,
    are a (Q, band + 1) matrix whose column m holds each query's weight at distance band - 1 - m (masked pairs
    fall on the rest), times the table's rows in falling order. Keys before the band add their weights up by
    the row they reach first.
    """
    start, K, Q = layout.band_start, alpha.size(-1), alpha.size(-2)
    out = 0
    if start:
        rows, local = layout.rows_reached(table.size(1))
        by_row = alpha.new_zeros(*alpha.shape[:-1], rows.size(-1))
        by_row.scatter_add_(-1, local.expand(*alpha.shape[:2], *local.shape), alpha[..., :start])
        out = by_row @ table[:, rows]
    if start < K:
        band = K - start
        weights = F.pad(alpha[..., start:].flatten(-2), (Q - 1, 1)).unflatten(-1, (Q, band + 1))
        out = out + weights @ falling(table, band)
    return out


def falling(table, band):
    """The rows of table (H, D, C) for distances band - 1 down to 0, then a row of zeros: (H, 1, band + 1, C)."""
    return F.pad(table[:, :band].flip(1), (0, 0, 0, 1)).unsqueeze(1)


def pad_tokens(t, before, after):
    """t (B, H, T, ...) with `before` and `after` zero tokens added along dim 2."""
    if not before and not after:
        return t
    widths = [0, 0] * (t.dim() - 3) + [before, after]
    return F.pad(t, widths)
