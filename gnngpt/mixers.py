"""Any PyTorch Geometric convolution built as the token mixer: its constructor arguments and how it is called."""
import functools
import inspect
import json
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .errors import UsageError
from .graph import causal_edge_index

GAT_LAYERS = ("GATConv", "GATv2Conv")
DENSE_LAYERS = (*GAT_LAYERS, "TransformerConv")  # the layers the fast backend computes as dense attention


@functools.cache
def pyg_nn():
    """torch_geometric.nn, imported on first use: with the torch._dynamo it imports, importing PyG takes seconds,
    which sample.py and evaluate.py on gpt and bigram runs, and every script's --help, need not spend (a training
    imports torch._dynamo anyway, through the fused AdamW, and saves under a second)."""
    with warnings.catch_warnings():
        # PyG 2.8 calls torch.jit.script at import time, which torch >= 2.10 flags as deprecated.
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script.*")
        import torch_geometric.nn
    return torch_geometric.nn


def mlp(in_width, hidden, out_width):
    """Linear, ReLU, Linear: the small network that GIN-, Edge- and NNConv-style layers apply."""
    return nn.Sequential(nn.Linear(in_width, hidden), nn.ReLU(), nn.Linear(hidden, out_width))


def causal_degree_histogram(block_size):
    """deg[d] = how many tokens of a block_size sequence have in-degree d in the causal graph (PNAConv)."""
    in_degree = torch.bincount(causal_edge_index(1, block_size)[1], minlength=block_size)
    return torch.bincount(in_degree, minlength=block_size + 1)


@dataclass(frozen=True)
class Recipe:
    """What one PyG layer needs beyond the standard arguments (in/out channels, heads, dropout)."""

    arguments: Callable = lambda cfg: {}  # required or better-suited constructor arguments
    edge_attr: bool = False  # forward reads a feature per edge j -> i: the distance (i - j) / block_size
    layer_stack: bool = False  # forward reads x as (N, layers, C), a stack of earlier representations


RECIPES = {
    "APPNP": Recipe(lambda cfg: dict(K=2, alpha=0.1)),
    "ChebConv": Recipe(lambda cfg: dict(K=2)),
    "DirGNNConv": Recipe(lambda cfg: dict(conv=pyg_nn().GCNConv(cfg.n_embd, cfg.n_embd))),
    "DNAConv": Recipe(layer_stack=True),
    "EdgeConv": Recipe(lambda cfg: dict(nn=mlp(2 * cfg.n_embd, cfg.n_embd, cfg.n_embd))),
    "EGConv": Recipe(lambda cfg: dict(num_heads=cfg.n_head)),  # n_head divides n_embd; the default 8 may not
    "FeaStConv": Recipe(lambda cfg: dict(out_channels=cfg.n_embd)),  # its heads are mixed, not concatenated
    "GatedGraphConv": Recipe(lambda cfg: dict(num_layers=2)),
    "GCN2Conv": Recipe(lambda cfg: dict(alpha=0.1)),
    "GeneralConv": Recipe(lambda cfg: dict(out_channels=cfg.n_embd)),  # its heads are averaged, not concatenated
    "GENConv": Recipe(lambda cfg: dict(norm="layer")),  # the default batch norm mixes statistics of all tokens
    "GINConv": Recipe(lambda cfg: dict(nn=mlp(cfg.n_embd, cfg.n_embd, cfg.n_embd))),
    "GINEConv": Recipe(lambda cfg: dict(nn=mlp(cfg.n_embd, cfg.n_embd, cfg.n_embd), edge_dim=1), edge_attr=True),
    "GMMConv": Recipe(lambda cfg: dict(dim=1, kernel_size=4), edge_attr=True),
    "GPSConv": Recipe(lambda cfg: dict(conv=pyg_nn().GCNConv(cfg.n_embd, cfg.n_embd))),
    "HypergraphConv": Recipe(lambda cfg: dict(out_channels=cfg.n_embd, heads=1)),  # heads need attention
    "NNConv": Recipe(lambda cfg: dict(nn=mlp(1, cfg.n_embd, cfg.n_embd * cfg.n_embd)), edge_attr=True),
    "PANConv": Recipe(lambda cfg: dict(filter_size=2)),
    "PDNConv": Recipe(lambda cfg: dict(edge_dim=1, hidden_channels=cfg.n_embd), edge_attr=True),
    "PNAConv": Recipe(lambda cfg: dict(aggregators=["mean", "min", "max", "std"],
                                       scalers=["identity", "amplification", "attenuation"],
                                       deg=causal_degree_histogram(cfg.block_size))),
    "SplineConv": Recipe(lambda cfg: dict(dim=1, kernel_size=4), edge_attr=True),
    "SSGConv": Recipe(lambda cfg: dict(alpha=0.1)),
}


def conv_layer_names():
    """Every convolution class that the installed torch_geometric.nn exports, sorted."""
    conv_module = set(pyg_nn().conv.__all__) - {"MessagePassing"}
    return sorted(name for name in dir(pyg_nn())
                  if isinstance(getattr(pyg_nn(), name), type) and (name.endswith("Conv") or name in conv_module))


def parse_layer_kwargs(text):
    """The dict of --gnn_kwargs, a JSON object of extra constructor arguments."""
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--gnn_kwargs is not valid JSON ({e}); write an object such as '{{\"K\": 2}}'") from None
    except RecursionError:
        raise UsageError("--gnn_kwargs nests too deeply to be read; write an object such as '{\"K\": 2}'") from None
    if not isinstance(kwargs, dict):
        raise UsageError(f"--gnn_kwargs must be a JSON object, got {text}; write an object such as '{{\"K\": 2}}'")
    return kwargs


def standard_arguments(layer_cls, cfg):
    """in/out channels, heads and dropout, for those of them that the layer's constructor takes."""
    params = inspect.signature(layer_cls.__init__).parameters
    per_head = "heads" in params
    values = dict(in_channels=cfg.n_embd, channels=cfg.n_embd, heads=cfg.n_head, dropout=cfg.dropout,
                  out_channels=cfg.n_embd // cfg.n_head if per_head else cfg.n_embd)
    return {k: v for k, v in values.items() if k in params}


class TokenMixer(nn.Module):
    """Calls any PyG layer as conv(x, edge_index[, edge_attr]) -> (N, n_embd): adds x_0, a map back to n_embd."""

    def __init__(self, conv, cfg, edge_attr, layer_stack):
        super().__init__()
        self.conv = conv
        self.edge_attr = edge_attr  # the layer reads a feature per edge: its distance (distance_features)
        self.layer_stack = layer_stack
        self.takes_x0 = "x_0" in inspect.signature(conv.forward).parameters  # GCN2Conv, FAConv: the block input
        self.proj = None
        was_training = conv.training
        conv.eval()  # a dry run on two tokens measures the output width, leaving batch-norm statistics alone
        with torch.no_grad():
            edge_index = causal_edge_index(1, 2)
            width = self.conv_output(torch.zeros(2, cfg.n_embd), edge_index,
                                     distance_features(edge_index, cfg.block_size)).size(-1)
        conv.train(was_training)
        if width != cfg.n_embd:
            self.proj = nn.Linear(width, cfg.n_embd)

    def conv_output(self, x, edge_index, edge_attr=None):
        inputs = (x[:, None] if self.layer_stack else x,) + ((x,) if self.takes_x0 else ())  # (N, [1,] C)
        extra = {"edge_attr": edge_attr} if self.edge_attr else {}
        y = self.conv(*inputs, edge_index, **extra)
        return y[0] if isinstance(y, tuple) else y  # PANConv also returns its path matrix

    def forward(self, x, edge_index, edge_attr=None):
        y = self.conv_output(x, edge_index, edge_attr)  # (N, width)
        return y if self.proj is None else self.proj(y)  # (N, n_embd)


def build_conv(cfg):
    """The token mixer for cfg.mixer: the raw PyG layer for GATConv/GATv2Conv, any other in a TokenMixer.

    With relative positions (cfg.pos "rel"), a layer whose constructor takes edge_dim gets edge_dim=1: each edge
    then carries its distance. GATConv and GATv2Conv with an edge_dim re-add every self-loop with the feature
    fill_value, which is set to 0.0, the distance of a token to itself (PyG's default would be the mean of the
    incoming edges'), unless --gnn_kwargs gives one.
    """
    layer_cls = getattr(pyg_nn(), cfg.mixer)
    params = inspect.signature(layer_cls.__init__).parameters
    distances = {"edge_dim": 1} if cfg.pos == "rel" and "edge_dim" in params else {}
    if cfg.mixer in GAT_LAYERS:
        kwargs = {"heads": cfg.n_head, "dropout": cfg.dropout, **distances, **cfg.mixer_kwargs}  # --gnn_kwargs last
        if kwargs.get("edge_dim") is not None:
            kwargs = {"fill_value": 0.0, **kwargs}
        return layer_cls(cfg.n_embd, cfg.n_embd // cfg.n_head, **kwargs)
    recipe = RECIPES.get(cfg.mixer, Recipe())
    kwargs = {**standard_arguments(layer_cls, cfg), **recipe.arguments(cfg), **distances, **cfg.mixer_kwargs}
    conv = layer_cls(**kwargs)
    edge_attr = recipe.edge_attr or kwargs.get("edge_dim") is not None
    return TokenMixer(conv, cfg, edge_attr, recipe.layer_stack)


def reads_distances_when_relative(name):
    """Whether the PyG layer called name gets each edge's distance as a feature under --pos rel."""
    params = inspect.signature(getattr(pyg_nn(), name).__init__).parameters
    return RECIPES.get(name, Recipe()).edge_attr or "edge_dim" in params


def reads_distances(conv):
    """Whether the mixer conv (a GATConv, a GATv2Conv or a TokenMixer) takes each edge's distance as a feature."""
    if isinstance(conv, TokenMixer):
        return conv.edge_attr
    return getattr(conv, "lin_edge", None) is not None


def distance_features(edge_index, block_size, dtype=torch.float32):
    """The feature of each edge j -> i for layers that read one: its distance (i - j) / block_size, (E, 1)."""
    return ((edge_index[1] - edge_index[0]).to(dtype) / block_size)[:, None]


def run_conv(conv, x, edge_index, block_size, **kwargs):
    """The mixer conv on the nodes x (N, C) and the edges edge_index, each edge's distance as its feature when
    conv reads one."""
    if reads_distances(conv):
        kwargs["edge_attr"] = distance_features(edge_index, block_size, x.dtype)
    return conv(x, edge_index, **kwargs)
