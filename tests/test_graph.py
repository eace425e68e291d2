import pytest
import torch

from gnngpt.graph import causal_edge_index


def brute_force_edges(B, T):
    return {(b * T + j, b * T + i) for b in range(B) for i in range(T) for j in range(i + 1)}


@pytest.mark.parametrize("B,T", [(1, 1), (1, 5), (3, 4), (2, 17), (5, 8)])
def test_causal_graph_matches_definition(B, T):
    edge_index = causal_edge_index(B, T)
    assert edge_index.shape == (2, B * T * (T + 1) // 2)
    assert edge_index.dtype == torch.long
    edges = list(zip(edge_index[0].tolist(), edge_index[1].tolist()))
    assert len(set(edges)) == len(edges)
    assert set(edges) == brute_force_edges(B, T)


def test_causal_graph_is_cached_per_shape():
    assert causal_edge_index(2, 6) is causal_edge_index(2, 6)
    assert causal_edge_index(2, 6) is not causal_edge_index(3, 6)
