"""The causality guard: which PyG convolutions can replace attention, and why the others cannot."""
import contextlib
import copy
import difflib
import functools
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .errors import TOO_BIG, UsageError, memory_error, one_line, out_of_memory
from .graph import causal_edge_index
from .mixers import GAT_LAYERS, build_conv, conv_layer_names, reads_distances_when_relative, run_conv
from .models import GPTConfig

PROBE_BATCH, PROBE_LEN = 2, 8  # sequences and tokens of the causality probe
PREFIX_RTOL = 1e-4  # a prefix's outputs alone may differ from theirs in the whole sequence by float rounding only
SUPPORT_SIZES = dict(n_embd=16, n_head=2, block_size=PROBE_LEN, dropout=0.1)  # sizes of the --list_layers table

HETEROGENEOUS = "heterogeneous: needs several node and edge types; tokens have one"
RELATIONAL = "relational: needs a relation type per edge; the causal graph has one relation"
POINT_CLOUD = "point-cloud layer: needs node positions in space (pos)"
KNN_GRAPH = "builds its own k-nearest-neighbour graph from the features instead of using the causal graph"
REFUSED = {
    "CuGraphGATConv": "cuGraph variant of GATConv: needs pylibcugraphops (CUDA only) and a CSC EdgeIndex; use GATConv",
    "CuGraphRGCNConv": RELATIONAL,
    "CuGraphSAGEConv": "cuGraph variant of SAGEConv: needs pylibcugraphops (CUDA only) and a CSC EdgeIndex; "
                       "use SAGEConv",
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


def static_refusal(name):
    """Why a layer can never mix tokens here, whatever its arguments, or "" when it may."""
    return DENSE if name.startswith("Dense") else REFUSED.get(name, "")


def check_layer_name(name, given=None, other_models=()):
    """Refuse a name that is not a PyG convolution or that names a layer that can never serve.

    given says where the user wrote name (default: --gat_version); other_models are the names besides PyG's
    accepted there (compare.py's bigram and gpt), suggested and listed as choices too.
    """
    names = conv_layer_names()
    if name not in names:
        close = suggestion(name, [*other_models, *names])
        hint = f"did you mean {close}? " if close else ""
        choices = f"{', '.join(other_models)} or " if other_models else ""
        raise UsageError(f"unknown {given or f'--gat_version {name!r}'}; {hint}choose {choices}a PyG convolution "
                         f"such as {' or '.join(GAT_LAYERS)} (python pyg-gpt.py --list_layers shows all)")
    if static_refusal(name):
        raise UsageError(f"{name} cannot replace attention: {static_refusal(name)}; "
                         f"choose a layer that --list_layers marks as working")


def suggestion(name, names):
    """The layer of names that name most likely means: the one it equals but for case, else the closest spelling
    (difflib), else None."""
    by_case = {n.lower(): n for n in names}
    if name.lower() in by_case:
        return by_case[name.lower()]
    close = difflib.get_close_matches(name, names, n=1)
    return close[0] if close else None


def run_seeded(module, *inputs):
    """module(*inputs) without gradients, with the same dropout masks on every call."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return module(*inputs)


def future_leak(layer, n_embd, seq_len=PROBE_LEN, batch_size=PROBE_BATCH, block_size=None):
    """How layer sees the future, or "": changing token t must leave every output before t exactly equal, and the
    outputs of the first t tokens alone must equal theirs in the whole sequence (to PREFIX_RTOL of their size).

    The probe runs on the complete causal graph (every other context graph is a part of it), in training mode
    (dropout, batch statistics) and in eval mode, on a copy of the layer; the prefixes in eval mode only, since
    the dropout masks drawn for a shorter sequence differ. A layer that reads edge features gets each edge's
    distance over block_size (default seq_len), as in the model.
    """
    B, T, C = batch_size, seq_len, n_embd
    edge_index = causal_edge_index(B, T)
    block_size = block_size or T
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C, generator=gen)
    for training in (True, False):
        mode = "training" if training else "eval"
        probe = copy.deepcopy(layer).train(training)
        call = functools.partial(run_conv, probe, edge_index=edge_index, block_size=block_size)
        base = run_seeded(call, x.view(B * T, C))
        if base.shape != (B * T, C):
            return f"returns shape {tuple(base.shape)} for {B * T} tokens of width {C}"
        if not torch.isfinite(base).all():
            return f"returns non-finite values in {mode} mode"
        base = base.view(B, T, C)
        for t in reversed(range(1, T)):  # the last token first
            changed = x.clone()
            changed[:, t] = torch.randn(B, C, generator=gen)
            out = run_seeded(call, changed.view(B * T, C)).view(B, T, C)
            if not torch.equal(out[:, :t], base[:, :t]):
                return (f"sees the future: changing token {t} changed the outputs of earlier tokens "
                        f"({mode} mode)")
        if training:
            continue  # the dropout masks drawn for a shorter sequence differ: prefixes are compared in eval mode
        for t in reversed(range(1, T)):
            prefix = functools.partial(run_conv, probe, edge_index=causal_edge_index(B, t), block_size=block_size)
            alone = run_seeded(prefix, x[:, :t].reshape(B * t, C)).view(B, t, C)
            if (alone - base[:, :t]).abs().max() > PREFIX_RTOL * base[:, :t].abs().max():
                return (f"depends on how many tokens follow: the outputs of the first {t} tokens alone differ from "
                        f"theirs in a sequence of {T} ({mode} mode)")
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


def refusal_reason(cfg, sized=False):
    """Why cfg.mixer cannot mix tokens with cfg's sizes and kwargs, or "" when it builds and is causal. sized: the
    sizes are the user's, whose memory running out is a UsageError about them, not a reason of the layer's."""
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
            refuse_if_too_big(e, sized)
            return f"cannot be built: {one_line(e)}"
        try:
            return future_leak(conv, cfg.n_embd, seq_len=min(cfg.block_size, PROBE_LEN), block_size=cfg.block_size)
        except ImportError as e:
            return f"needs a package that is not installed: {one_line(e)}"
        except Exception as e:  # noqa: BLE001
            refuse_if_too_big(e, sized)
            return f"fails on the causal graph: {one_line(e)}"


def refuse_if_too_big(error, sized):
    """A UsageError when error is memory running out at the user's sizes: they are at fault, not the layer."""
    if sized and out_of_memory(error):
        raise memory_error(error, TOO_BIG, "lower --n_embd, or the layer's sizes in --gnn_kwargs") from None


def check_layer(cfg):
    """The causality guard: refuse cfg.mixer with a one-line UsageError unless it builds and never sees the future."""
    check_layer_name(cfg.mixer)
    reason = refusal_reason(cfg, sized=True)
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
    distances: bool  # reads each edge's distance as a feature with --pos rel; else it sees the graph's structure


def layer_support():
    """One record per convolution class of the installed PyG: does it work as the token mixer, and why not.

    Each layer is built and probed at the small sizes SUPPORT_SIZES with its default arguments.
    """
    records = []
    for name in tqdm(conv_layer_names(), desc="probing layers", unit="layer", leave=False):
        reason = refusal_reason(GPTConfig(**SUPPORT_SIZES, mixer=name))
        records.append(LayerSupport(name, not reason, reason, reads_distances_when_relative(name)))
    return records


def format_layer_table(records):
    """The --list_layers table: one line per layer, its status and the reason it is refused."""
    width = max(len(r.name) for r in records)
    lines = [f"{'layer':<{width}}  works  distances  reason"]
    lines += [f"{r.name:<{width}}  {'yes' if r.works else 'no':<5}  {'yes' if r.distances else 'no':<9}  {r.reason}"
              .rstrip() for r in records]
    n_working = sum(r.works for r in records)
    lines.append(f"{n_working} of {len(records)} convolution classes work as the token mixer; with --pos rel, "
                 f"those marked 'distances' read each edge's distance i - j, the others see only the graph")
    return "\n".join(lines)
