"""The causal context graph: token j sends a message to token i for every j <= i, as edges and as a mask."""
import functools

import torch


@functools.lru_cache(maxsize=16)
def causal_edge_index(batch_size, seq_len, device="cpu"):
    """Edges j -> i for all j <= i in each of batch_size sequences of seq_len nodes, node ids offset by b*T.

    Returns a (2, batch_size * seq_len * (seq_len + 1) / 2) LongTensor: row 0 holds sources, row 1 targets.
    Cached per (batch_size, seq_len, device); treat the result as read-only.
    """
    dst, src = torch.tril_indices(seq_len, seq_len, device=device)  # dst >= src
    offsets = torch.arange(batch_size, device=device).repeat_interleave(dst.numel()) * seq_len
    return torch.stack([src.repeat(batch_size) + offsets, dst.repeat(batch_size) + offsets])


def causal_bias(T, device, dtype=torch.float32):
    """(T, T) additive mask, 0 where query i sees key j <= i and -inf where the key comes after it.

    Adding it to finite scores before a softmax masks them as masked_fill would, several times faster on a CPU,
    forward and backward.
    """
    return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu_(diagonal=1)  # zeroes what lies below
