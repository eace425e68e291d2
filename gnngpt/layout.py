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
"""
import functools

import torch
from torch.nn import functional as F

MIN_CHUNK = 32  # queries per chunk of a BandedLayout, at least: fewer would spend more on overhead than they save


def layout_for(graph, T, device):
    """The cheaper arrangement of graph over T tokens (cached: treat its tensors as read-only)."""
    return cached_layout(graph, T, torch.device(device))


@functools.lru_cache(maxsize=64)
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
    if bias is None:
        return F.scaled_dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], dropout_p=dropout,
                                              is_causal=True).unsqueeze(2)
    bias = bias.to(q.dtype)
    if q.size(2) == 1:
        out = F.scaled_dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], attn_mask=bias[..., 0, :, :],
                                             dropout_p=dropout)
        return out.unsqueeze(2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)


def pad_tokens(t, before, after):
    """t (B, H, T, ...) with `before` and `after` zero tokens added along dim 2."""
    if not before and not after:
        return t
    widths = [0, 0] * (t.dim() - 3) + [before, after]
    return F.pad(t, widths)
