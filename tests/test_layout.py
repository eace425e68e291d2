"""Window-like graphs are computed on their bands: work and memory that grow with the edges, not with T * T."""
import warnings
from dataclasses import replace

import pytest
import torch

from conftest import defined_edges, tiny_config
from gnngpt import graph as graph_module, layout
from gnngpt.decoder import LayerCache, Slots
from gnngpt.graph import ContextGraph, parse_graph
from gnngpt.layout import BandedLayout, DenseLayout, layout_for
from gnngpt.mixers import DENSE_LAYERS
from gnngpt.models import GPT

T = 1024


@pytest.mark.parametrize("spec,G,R", [("window:64", 0, 63), ("dilated:16:4", 0, 60), ("sink:4:16", 4, 15)])
def test_window_like_graphs_at_a_long_block_take_a_band_of_keys(spec, G, R):
    (graph,) = parse_graph(spec, 1)
    arranged = layout_for(graph, T, "cpu")
    assert isinstance(arranged, BandedLayout)
    Q = max(layout.MIN_CHUNK, R + 1)
    n = -(-T // Q)
    assert arranged.edge.shape == (n, Q, G + Q + R)  # each query scores G + Q + R keys, not T
    assert arranged.edge.numel() < T * T / 4
    assert arranged.edge.sum().item() == len(defined_edges(spec, T)) + (n * Q - T)  # padding queries see themselves


@pytest.mark.parametrize("spec", ["full", "strided:16:16", "window:1000"])
def test_graphs_whose_band_is_the_whole_block_stay_dense(spec):
    (graph,) = parse_graph(spec, 1)
    assert isinstance(layout_for(graph, T, "cpu"), DenseLayout)


def test_window_edges_are_built_without_the_T_by_T_mask(monkeypatch):
    def no_mask(self, T, device="cpu"):
        raise AssertionError("a window-like graph built a (T, T) mask")

    graph = ContextGraph("sink", (2, 5))
    graph_module.graph_edge_index.cache_clear()
    monkeypatch.setattr(ContextGraph, "mask", no_mask)
    edge_index = graph.edge_index(1, 300)
    assert set(zip(edge_index[0].tolist(), edge_index[1].tolist())) == defined_edges("sink:2:5", 300)


@pytest.mark.parametrize("mixer", ["attention", *DENSE_LAYERS])
@pytest.mark.parametrize("pos", ["abs", "rel"])
def test_models_on_a_window_never_arrange_all_keys(mixer, pos, monkeypatch):
    def no_dense(self, graph, T, device):
        raise AssertionError("a window-like graph took the dense T x T layout")

    layout.cached_layout.cache_clear()
    monkeypatch.setattr(DenseLayout, "__init__", no_dense)
    model = GPT(tiny_config(mixer, block_size=128, graph="window:8", pos=pos, backend="fast")).eval()
    x = torch.randint(0, 17, (2, 128))
    logits, loss = model(x, x)
    loss.backward()
    assert logits.shape == (2, 128, 17)


def arranged(kind, spec, T):
    (graph,) = parse_graph(spec, 1)
    if kind == "dense":
        return DenseLayout(graph, T, "cpu")
    if kind == "banded":
        return BandedLayout(graph, T, 4, "cpu")
    slots = Slots(graph, T + 3, "cpu")  # a cache with free slots, its tokens written past the first slot
    slots.begin(torch.arange(2, T + 2))
    return LayerCache(slots)


@pytest.mark.parametrize("kind,spec", [("dense", "full"), ("dense", "strided:3:4"), ("banded", "window:3"),
                                       ("banded", "sink:2:3"), ("cache", "full"), ("cache", "sink:2:3")])
@pytest.mark.parametrize("T,D", [(13, 16), (14, 14)])  # a short batch; a full one whose chunks pad it past D
def test_terms_by_distance_equal_the_table_looked_up_at_each_pairs_distance(kind, spec, T, D):
    B, H, C = 2, 3, 5
    arrangement = arranged(kind, spec, T)
    n, Q, K = arrangement.distance.shape
    q = torch.randn(B, H, n, Q, C, dtype=torch.float64, requires_grad=True)
    table = torch.randn(H, D, C, dtype=torch.float64, requires_grad=True)
    edge = arrangement.bias.isfinite()
    alpha = torch.rand(B, H, n, Q, K, dtype=torch.float64).where(edge, 0).requires_grad_()
    looked_up = table[:, arrangement.distance]  # (H, n, Q, K, C): the row of each pair's distance
    scores = layout.distance_scores(q, table, arrangement)
    summed = layout.distance_sum(alpha, table, arrangement)
    expected_scores = torch.einsum("bhnqc,hnqkc->bhnqk", q, looked_up)
    expected_sum = torch.einsum("bhnqk,hnqkc->bhnqc", alpha, looked_up)
    assert torch.allclose(scores.where(edge, 0), expected_scores.where(edge, 0))
    assert torch.allclose(summed, expected_sum)
    w_scores, w_sum = torch.randn_like(scores).where(edge, 0), torch.randn_like(summed)
    got = torch.autograd.grad((scores * w_scores).sum() + (summed * w_sum).sum(), (q, table, alpha))
    want = torch.autograd.grad((expected_scores * w_scores).sum() + (expected_sum * w_sum).sum(), (q, table, alpha))
    assert torch.allclose(got[0], want[0]) and torch.allclose(got[1], want[1])
    assert torch.allclose(got[2].where(edge, 0), want[2].where(edge, 0))  # masked weights are zero, whatever they get


@pytest.mark.parametrize("mixer,backend,spec,pos,kwargs", [
    ("GATConv", "fast", "full", "abs", {}), ("GATConv", "fast", "window:4", "abs", {}),
    ("GATConv", "pyg", "full", "abs", {}),
    ("GATv2Conv", "fast", "full", "rel", {"negative_slope": 0.3}),  # the scores traced apart from the fused kernel
    ("GATv2Conv", "fast", "window:4", "rel", {"negative_slope": 0.3})])
def test_the_graph_caches_serve_eager_passes_and_are_traced_under_torch_compile(mixer, backend, spec, pos, kwargs):
    cfg = tiny_config(mixer, block_size=64, graph=spec, backend=backend, pos=pos, mixer_kwargs=kwargs)
    model = GPT(cfg).eval()
    x = torch.randint(0, 17, (2, 64))
    eager = model(x)[0]
    if backend == "fast":  # as PyG's message passing computes it with the same weights
        reference = GPT(replace(cfg, backend="pyg")).eval()
        reference.load_state_dict(model.state_dict())
        torch.testing.assert_close(eager, reference(x)[0])
    assert layout_for(ContextGraph("full"), 8, "cpu") is layout_for(ContextGraph("full"), 8, "cpu")
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.compile(model, backend="eager")(x)[0]  # Dynamo's trace, no C++ compiler needed
    assert not [w for w in caught if "lru_cache" in str(w.message)]  # Dynamo skipped none, and said nothing
    torch.testing.assert_close(traced, eager)
