"""Figures of the results, drawn with matplotlib's Agg canvas (no display needed) and written atomically."""
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .files import atomic_write


def save_figure(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def plot_val_loss(summaries, path, title, published=None, published_step=None):
    """Validation loss against step, one line per run (see results.run_summary), like the original figure.

    published ({name: loss}) marks the original's values at published_step with a cross of each run's colour.
    """
    published = published or {}
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for s in summaries:
        (line,) = ax.plot(s["steps"], s["val_loss"], label=f"{s['name']} ({s['final_val_loss']:.3f})", linewidth=1.8)
        if s["name"] in published:
            ax.plot([published_step], [published[s["name"]]], "x", color=line.get_color(), markersize=9)
    if published:
        ax.plot([], [], "x", color="black", label=f"published, step {published_step}")
    ax.set(xlabel="step", ylabel="validation loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend(title="model (final val loss)")
    save_figure(fig, path)


def plot_leaderboard(summaries, path, title):
    """Final validation loss and training speed per run, best loss on top."""
    ranked = sorted(summaries, key=lambda s: s["final_val_loss"], reverse=True)
    names = [s["name"] for s in ranked]
    fig = Figure(figsize=(10, 1.5 + 0.3 * len(ranked)), layout="constrained")
    loss_ax, speed_ax = fig.subplots(1, 2, sharey=True)
    loss_ax.plot([s["final_val_loss"] for s in ranked], names, "o", color="tab:blue")
    loss_ax.set(xlabel="final validation loss (lower is better)")
    speed_ax.barh(names, [s["tokens_per_s"] or 0 for s in ranked], color="tab:orange")
    speed_ax.set(xlabel="training tokens per second (log scale)", xscale="log")
    for ax in (loss_ax, speed_ax):
        ax.grid(alpha=0.3)
    loss_ax.set_ylim(-0.5, len(ranked) - 0.5)
    fig.suptitle(title)
    save_figure(fig, path)


GRAPH_MARKERS = "sD^vP*XhpH<>d8"  # one per graph of a graph study, in order (after 14 they repeat); circles
# stand for the positions in its legend


def plot_graph_study(summaries, path, title):
    """Write graph_study_figure(summaries, title) to path."""
    save_figure(graph_study_figure(summaries, title), path)


def graph_study_figure(summaries, title):
    """Final validation loss against edges per token and against training speed, one point per run: a colour per
    model, a marker per graph, filled for absolute positions and hollow for relative ones, all named in a legend
    beside the plots (labels at the points would print over each other where runs lie close). A run without a
    graph (the bigram) is a dashed line across both."""
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    edges_ax, speed_ax = fig.subplots(1, 2, sharey=True)
    models = list(dict.fromkeys(s["model"] for s in summaries))
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    graphs = list(dict.fromkeys(s["graph"] for s in summaries if s["graph"] is not None))
    markers = {g: GRAPH_MARKERS[i % len(GRAPH_MARKERS)] for i, g in enumerate(graphs)}
    for s in summaries:
        if s["graph"] is None:
            for ax in (edges_ax, speed_ax):
                ax.axhline(s["final_val_loss"], color=colors[s["model"]], linestyle="--", linewidth=1)
            continue
        style = dict(marker=markers[s["graph"]], markersize=8, color=colors[s["model"]], linestyle="none",
                     markerfacecolor=colors[s["model"]] if s["pos"] != "rel" else "none")
        for ax, x in ((edges_ax, s["edges_per_token"]), (speed_ax, s["tokens_per_s"] or 0)):
            ax.plot(x, s["final_val_loss"], **style)
    edges_ax.set(xlabel="edges per token (mean in-degree of a full block, log scale)", xscale="log",
                 ylabel="final validation loss")
    speed_ax.set(xlabel="training tokens per second")
    handles = [Patch(color=colors[m], label=m) for m in models
               if any(s["model"] == m and s["graph"] is not None for s in summaries)]
    handles += [Line2D([], [], color=colors[s["model"]], linestyle="--", label=s["model"]) for s in summaries
                if s["graph"] is None]
    handles += [Line2D([], [], color="gray", marker=markers[g], linestyle="none", label=g) for g in graphs]
    handles += [Line2D([], [], color="gray", marker="o", linestyle="none", label="absolute positions"),
                Line2D([], [], color="gray", marker="o", markerfacecolor="none", linestyle="none",
                       label="relative positions")]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    for ax in (edges_ax, speed_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def plot_attention(maps, tokens, path, title, agreement=None):
    """Heatmaps of attention maps, a list over layers of (H, T, T), with the tokens as tick labels.

    agreement (layers x heads), when given, is printed in each heatmap's title (see attention.rank_agreement).
    """
    n_layer, n_head = len(maps), maps[0].size(0)
    labels = [{" ": "␣"}.get(t, repr(t)[1:-1]) for t in tokens]  # space as ␣, newline as \n
    size = 1.2 + 0.16 * len(tokens)
    fig = Figure(figsize=(size * n_head, size * n_layer + 0.6), layout="constrained")
    axes = fig.subplots(n_layer, n_head, squeeze=False)
    for layer, layer_maps in enumerate(maps):
        for head in range(n_head):
            ax = axes[layer, head]
            weights = layer_maps[head].cpu().numpy().copy()
            weights[np.triu_indices_from(weights, k=1)] = np.nan  # later tokens: not attended
            image = ax.imshow(weights, cmap="viridis", vmin=0, vmax=1)
            heading = f"layer {layer + 1}, head {head + 1}"
            if agreement is not None:
                heading += f"\nrank agreement {agreement[layer][head]:.2f}"
            ax.set_title(heading, fontsize=9)
            ax.set_xticks(range(len(labels)), labels, fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.set_xlabel("attended token (key)", fontsize=8)
            ax.set_ylabel("query token", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    fig.suptitle(title)
    save_figure(fig, path)
