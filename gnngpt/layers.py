"""Builds any PyTorch Geometric convolution as the token mixer and refuses those that cannot serve or see the future."""
import contextlib
import copy
import difflib
import inspect
import json
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

with warnings.catch_warnings():
    # PyG 2.8 calls torch.jit.script at import time, which torch >= 2.10 flags as deprecated.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script.*")
    import torch_geometric.nn as pyg_nn
    from torch_geometric.utils import degree

from .errors import UsageError, one_line
from .graph import causal_edge_index

GAT_LAYERS = ("GATConv", "GATv2Conv")
PROBE_BATCH, PROBE_LEN = 2, 8  # sequences and tokens of the causality probe
SUPPORT_SIZES = dict(n_embd=16, n_head=2, block_size=PROBE_LEN, dropout=0.1)  # sizes of the --list_layers table


def mlp(in_width, hidden, out_width):
    """Linear, ReLU, Linear: the small network that GIN-, Edge- and NNConv-style layers apply."""
    return nn.Sequential(nn.Linear(in_width, hidden), nn.ReLU(), nn.Linear(hidden, out_width))


def causal_degree_histogram(block_size):
    """deg[d] = how many tokens of a block_size sequence have in-degree d in the causal graph (PNAConv)."""
    in_degree = degree(causal_edge_index(1, block_size)[1], block_size, dtype=torch.long)
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
    "DirGNNConv": Recipe(lambda cfg: dict(conv=pyg_nn.GCNConv(cfg.n_embd, cfg.n_embd))),
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
    "GPSConv": Recipe(lambda cfg: dict(conv=pyg_nn.GCNConv(cfg.n_embd, cfg.n_embd))),
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

HETEROGENEOUS = "heterogeneous: needs several node and edge types; tokens have one"
RELATIONAL = "relational: needs a relation type per edge; the causal graph has one relation"
POINT_CLOUD = "point-cloud layer: needs node positions in space (pos)"
KNN_GRAPH = "builds its own k-nearest-neighbour graph from the features instead of using the causal graph"
REFUSED = {
    "CuGraphGATConv": "cuGraph variant of GATConv: needs pylibcugraphops (CUDA only) and a CSC EdgeIndex; use GATConv",
    "CuGraphRGCNConv": RELATIONAL,
    "CuGraphSAGEConv": "cuGraph variant of SAGEConv: needs pylibcugraphops (CUDA only) and a CSC EdgeIndex; use SAGEConv",
    "DynamicEdgeConv": KNN_GRAPH,
    "FastRGCNConv": RELATIONAL,
    "FusedGATConv": "takes the graph as CSR and CSC tensors and needs dgNN (CUDA only); use GATConv",
    "GravNetConv": KNN_GRAPH,
    "HANConv": HETEROGENEOUS,
    "HEATConv": HETEROGENEOUS,
    "HGTConv": HETEROGENEOUS,
    "HeteroConv": HETEROGENEOUS,
    "MeshCNNConv": "mesh layer: convolves mesh edges that have exactly four neighbours each",
    "PointGNNConv": POINT_CLOUD,
    "PointNetConv": POINT_CLOUD,
    "PointTransformerConv": POINT_CLOUD,
    "PPFConv": POINT_CLOUD,
    "RGATConv": RELATIONAL,
    "RGCNConv": RELATIONAL,
    "SignedConv": "signed-graph layer: needs separate positive and negative edge sets",
    "WLConv": "returns discrete Weisfeiler-Lehman colour ids, not trainable features",
    "XConv": POINT_CLOUD,
}
DENSE = "dense layer: takes a (B, N, N) adjacency matrix, not an edge_index"


def conv_layer_names():
    """Every convolution class that the installed torch_geometric.nn exports, sorted."""
    conv_module = set(pyg_nn.conv.__all__) - {"MessagePassing"}
    return sorted(name for name in dir(pyg_nn)
                  if isinstance(getattr(pyg_nn, name), type) and (name.endswith("Conv") or name in conv_module))


def static_refusal(name):
    """Why a layer can never mix tokens here, whatever its arguments, or "" when it may."""
    return DENSE if name.startswith("Dense") else REFUSED.get(name, "")


def check_layer_name(name):
    """Refuse a name that is not a PyG convolution or that names a layer that can never serve."""
    names = conv_layer_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"unknown --gat_version {name!r}; {hint}choose a PyG convolution such as "
                         f"{' or '.join(GAT_LAYERS)} (--list_layers shows all)")
    if static_refusal(name):
        raise UsageError(f"{name} cannot replace attention: {static_refusal(name)}; "
                         f"choose a layer that --list_layers marks as working")


def parse_layer_kwargs(text):
    """The dict of --gnn_kwargs, a JSON object of extra constructor arguments."""
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--gnn_kwargs is not valid JSON ({e}); write an object such as '{{\"K\": 2}}'") from None
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
    """Calls any PyG layer as conv(x, edge_index) -> (N, n_embd): adds x_0, edge features, a map back to n_embd."""

    def __init__(self, conv, cfg, edge_attr, layer_stack):
        super().__init__()
        self.conv = conv
        self.block_size = cfg.block_size
        self.edge_attr = edge_attr
        self.layer_stack = layer_stack
        self.takes_x0 = "x_0" in inspect.signature(conv.forward).parameters  # GCN2Conv, FAConv: the block input
        self.proj = None
        was_training = conv.training
        conv.eval()  # a dry run on two tokens measures the output width, leaving batch-norm statistics alone
        with torch.no_grad():
            width = self.conv_output(torch.zeros(2, cfg.n_embd), causal_edge_index(1, 2)).size(-1)
        conv.train(was_training)
        if width != cfg.n_embd:
            self.proj = nn.Linear(width, cfg.n_embd)

    def conv_output(self, x, edge_index):
        inputs = (x[:, None] if self.layer_stack else x,) + ((x,) if self.takes_x0 else ())  # (N, [1,] C)
        extra = {}
        if self.edge_attr:
            distance = (edge_index[1] - edge_index[0]).to(x.dtype)
            extra["edge_attr"] = (distance / self.block_size)[:, None]  # (E, 1) in [0, 1)
        y = self.conv(*inputs, edge_index, **extra)
        return y[0] if isinstance(y, tuple) else y  # PANConv also returns its path matrix

    def forward(self, x, edge_index):
        y = self.conv_output(x, edge_index)  # (N, width)
        return y if self.proj is None else self.proj(y)  # (N, n_embd)


def build_conv(cfg):
    """The token mixer for cfg.mixer: the raw PyG layer for GATConv/GATv2Conv, any other in a TokenMixer."""
    layer_cls = getattr(pyg_nn, cfg.mixer)
    if cfg.mixer in GAT_LAYERS:
        kwargs = {"heads": cfg.n_head, "dropout": cfg.dropout, **cfg.mixer_kwargs}  # --gnn_kwargs override
        return layer_cls(cfg.n_embd, cfg.n_embd // cfg.n_head, **kwargs)
    recipe = RECIPES.get(cfg.mixer, Recipe())
    kwargs = {**standard_arguments(layer_cls, cfg), **recipe.arguments(cfg), **cfg.mixer_kwargs}
    conv = layer_cls(**kwargs)
    edge_attr = recipe.edge_attr or kwargs.get("edge_dim") is not None
    return TokenMixer(conv, cfg, edge_attr, recipe.layer_stack)


def run_seeded(module, *inputs):
    """module(*inputs) without gradients, with the same dropout masks on every call."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return module(*inputs)


def future_leak(layer, n_embd, seq_len=PROBE_LEN, batch_size=PROBE_BATCH):
    """How layer sees the future, or "": changing token t must leave every output before t exactly equal.

    The probe runs in training mode (dropout, batch statistics) and in eval mode, on a copy of the layer.
    """
    B, T, C = batch_size, seq_len, n_embd
    edge_index = causal_edge_index(B, T)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C, generator=gen)
    for training in (True, False):
        mode = "training" if training else "eval"
        probe = copy.deepcopy(layer).train(training)
        base = run_seeded(probe, x.view(B * T, C), edge_index)
        if base.shape != (B * T, C):
            return f"returns shape {tuple(base.shape)} for {B * T} tokens of width {C}"
        if not torch.isfinite(base).all():
            return f"returns non-finite values in {mode} mode"
        base = base.view(B, T, C)
        for t in reversed(range(1, T)):  # the last token first
            changed = x.clone()
            changed[:, t] = torch.randn(B, C, generator=gen)
            out = run_seeded(probe, changed.view(B * T, C), edge_index).view(B, T, C)
            if not torch.equal(out[:, :t], base[:, :t]):
                return (f"sees the future: changing token {t} changed the outputs of earlier tokens "
                        f"({mode} mode)")
    return ""


@contextlib.contextmanager
def one_thread():
    """Run torch on one CPU thread: on the probe's tiny tensors more threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def refusal_reason(cfg):
    """Why cfg.mixer cannot mix tokens with cfg's sizes and kwargs, or "" when it builds and is causal."""
    reason = static_refusal(cfg.mixer)
    if reason:
        return reason
    if cfg.mixer_kwargs.get("cached"):
        return "cached=True reuses the graph of the first batch, but the causal graph changes with the batch shape"
    with torch.random.fork_rng(devices=[]), one_thread():  # leaves the caller's random state as it was
        try:
            conv = build_conv(cfg)
        except ImportError as e:
            return f"needs a package that is not installed: {one_line(e)}"
        except Exception as e:  # noqa: BLE001 - any failure of a third-party layer is a refusal with its reason
            return f"cannot be built: {one_line(e)}"
        try:
            return future_leak(conv, cfg.n_embd, seq_len=min(cfg.block_size, PROBE_LEN))
        except ImportError as e:
            return f"needs a package that is not installed: {one_line(e)}"
        except Exception as e:  # noqa: BLE001
            return f"fails on the causal graph: {one_line(e)}"


def check_layer(cfg):
    """The causality guard: refuse cfg.mixer with a one-line UsageError unless it builds and never sees the future."""
    check_layer_name(cfg.mixer)
    reason = refusal_reason(cfg)
    if reason:
        fix = "change --gnn_kwargs or choose" if cfg.mixer_kwargs else "choose"
        raise UsageError(f"{cfg.mixer} cannot replace attention: {reason}; "
                         f"{fix} a layer that --list_layers marks as working")


@dataclass(frozen=True)
class LayerSupport:
    """Whether one PyG convolution class works as the token mixer, and why not ("" when it works)."""

    name: str
    works: bool
    reason: str


def layer_support():
    """One record per convolution class of the installed PyG: does it work as the token mixer, and why not.

    Each layer is built and probed at the small sizes SUPPORT_SIZES with its default arguments.
    """
    from .models import GPTConfig  # models imports this module

    records = []
    for name in tqdm(conv_layer_names(), desc="probing layers", unit="layer", leave=False):
        reason = refusal_reason(GPTConfig(**SUPPORT_SIZES, mixer=name))
        records.append(LayerSupport(name, not reason, reason))
    return records


def format_layer_table(records):
    """The --list_layers table: one line per layer, its status and the reason it is refused."""
    width = max(len(r.name) for r in records)
    lines = [f"{'layer':<{width}}  works  reason"]
    lines += [f"{r.name:<{width}}  {'yes' if r.works else 'no':<5}  {r.reason}".rstrip() for r in records]
    n_working = sum(r.works for r in records)
    lines.append(f"{n_working} of {len(records)} convolution classes work as the token mixer")
    return "\n".join(lines)
