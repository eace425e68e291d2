"""Builds the PyTorch Geometric convolution that mixes tokens along the causal graph."""
import warnings

with warnings.catch_warnings():
    # PyG 2.8 calls torch.jit.script at import time, which torch >= 2.10 flags as deprecated.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script.*")
    import torch_geometric.nn as pyg_nn

from .errors import UsageError

GAT_LAYERS = ("GATConv", "GATv2Conv")


def check_layer_name(name):
    """Refuse a layer name that cannot serve as the token mixer."""
    if name not in GAT_LAYERS:
        raise UsageError(f"unknown --gat_version {name!r}; choose one of {', '.join(GAT_LAYERS)}")


def build_conv(cfg):
    """The PyG layer cfg.mixer with cfg.n_head heads of n_embd // n_head channels, concatenated."""
    return getattr(pyg_nn, cfg.mixer)(
        cfg.n_embd, cfg.n_embd // cfg.n_head, heads=cfg.n_head, dropout=cfg.dropout, **cfg.mixer_kwargs
    )
