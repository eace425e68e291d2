import pytest
import torch

from conftest import defined_edges
from gnngpt.errors import UsageError
from gnngpt.graph import FULL, causal_edge_index, graph_spec, parse_graph

SPECS = ["full", "window:1", "window:3", "window:8", "dilated:3:2", "dilated:1:5", "dilated:4:3", "strided:2:3",
         "strided:4:16", "sink:1:1", "sink:2:3", "sink:9:2",
         "window:2147483647", "dilated:2:2147483647", "strided:2147483647:2147483647", "sink:2147483647:2",
         "sink:2:2147483647"]  # the largest parameters: no more candidates than the sequence holds


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("B,T", [(1, 1), (2, 2), (1, 5), (3, 17)])  # T below and above W, G and S
def test_each_graph_equals_its_definition_and_is_causal(spec, B, T):
    (graph,) = parse_graph(spec, 1)
    edge_index = graph.edge_index(B, T)
    assert edge_index.dtype == torch.long
    edges = list(zip(edge_index[0].tolist(), edge_index[1].tolist()))
    assert len(set(edges)) == len(edges)
    expected = {(b * T + j, b * T + i) for b in range(B) for j, i in defined_edges(spec, T)}
    assert set(edges) == expected
    assert all(j <= i for j, i in edges) and all((i, i) in edges for i in range(B * T))  # causal, self-loops
    mask = graph.mask(T)
    assert {(j, i) for i, j in mask.nonzero().tolist()} == defined_edges(spec, T)
    bias = graph.bias(T)
    assert torch.equal(bias == 0, mask) and torch.all(bias[~mask] == float("-inf"))
    assert graph.edges_per_token(T) == len(defined_edges(spec, T)) / T


@pytest.mark.parametrize("T", [1, 3, 6, 20])  # T below and above every W, D, G and S
def test_a_per_layer_list_gives_each_layer_its_graph(T):
    specs = ["window:2", "dilated:3:2", "full", "sink:4:5"]
    graphs = parse_graph("window:2, dilated:3:2,full,sink:4:5", 4)
    assert [g.spec for g in graphs] == specs
    for graph, spec in zip(graphs, specs):
        edges = graph.edge_index(2, T)
        assert set(zip(edges[0].tolist(), edges[1].tolist())) == {
            (b * T + j, b * T + i) for b in range(2) for j, i in defined_edges(spec, T)}
    assert parse_graph("window:4", 3) == parse_graph("window:4,window:4,window:4", 3)
    assert graph_spec(parse_graph("window:4,window:4", 2)) == "window:4"
    assert graph_spec(graphs) == "window:2,dilated:3:2,full,sink:4:5"


def test_reach_is_the_longest_edge_of_window_like_graphs():
    for spec, T in [("window:5", 30), ("dilated:4:3", 30)]:
        (graph,) = parse_graph(spec, 1)
        assert graph.reach == max(i - j for j, i in defined_edges(spec, T))
    assert [g.reach for g in parse_graph("full,strided:2:3,sink:1:2", 3)] == [None, None, None]


@pytest.mark.parametrize("B,T", [(1, 1), (1, 5), (3, 4), (2, 17)])
def test_the_complete_causal_graph_is_the_full_graph(B, T):
    edges = {(b * T + j, b * T + i) for b in range(B) for i in range(T) for j in range(i + 1)}  # j -> i, j <= i
    assert set(map(tuple, causal_edge_index(B, T).t().tolist())) == edges
    assert set(map(tuple, FULL.edge_index(B, T).t().tolist())) == edges
    assert causal_edge_index(B, T).shape == (2, B * T * (T + 1) // 2)
    assert causal_edge_index(2, 6) is causal_edge_index(2, 6)  # cached per shape


BAD_SPECS = [
    ("", "--graph '' names nothing; give a comma-separated list such as window:4,full"),
    ("window:2,,full", "--graph 'window:2,,full' has an empty item; remove the extra comma"),
    ("ring:3", "--graph 'ring:3': unknown graph 'ring'; use full, window:W"),
    ("window", "--graph 'window': window takes 1 number(s), as in window:W"),
    ("window:3:2", "--graph 'window:3:2': window takes 1 number(s), as in window:W"),
    ("full:3", "--graph 'full:3': full takes 0 number(s), as in full"),
    ("window:0", "--graph 'window:0': W must be an integer from 1 to 2147483647, got '0' (in window:W)"),
    ("dilated:4:x", "--graph 'dilated:4:x': D must be an integer from 1 to 2147483647, got 'x' (in dilated:W:D)"),
    ("sink:-1:4", "--graph 'sink:-1:4': G must be an integer from 1 to 2147483647, got '-1' (in sink:G:W)"),
    ("window:\u00b2", "--graph 'window:\u00b2': W must be an integer from 1 to 2147483647, got '\u00b2' (in window:W)"),
    ("window:2147483648", "--graph 'window:2147483648': W must be an integer from 1 to 2147483647, got "
                          "'2147483648' (in window:W)"),
    ("window:2,window:4", "--graph 'window:2,window:4' lists 2 graphs for 3 layers; give one graph for every layer "
                          "or one for each of the 3"),
    ("[window:2,window:4", "--graph '[window:2,window:4' has a bracket; write a per-layer list without brackets, as "
                           "in window:4,window:16 (only compare.py's --graphs groups one in brackets)"),
    ("[window:2,window:4,full]", "--graph '[window:2,window:4,full]' has a bracket; write a per-layer list without "
                                 "brackets"),
]


@pytest.mark.parametrize("spec,message", BAD_SPECS)
def test_bad_specs_are_refused_with_a_one_line_message(spec, message):
    with pytest.raises(UsageError) as e:
        parse_graph(spec, 3)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
