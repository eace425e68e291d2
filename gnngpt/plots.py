"""Figures of the results, drawn with matplotlib's Agg canvas (no display needed) and written atomically."""
import json
import os
import struct
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .files import atomic_write

ATTENTION_FIGURE = "attention maps drawn by plot_attention.py"  # the Description of plot_attention's PNGs
DRAWN_FROM = "Drawn from"  # the PNG text of an attention figure that records its run and prompt
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def save_figure(fig, path, texts=None):
    """fig as a PNG at path, with texts ({keyword: text}) as text chunks in its metadata where given."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, metadata=texts))


def png_texts(path):
    """The text chunks (tEXt) of the PNG at path as {keyword: text}, read chunk by chunk without decoding its image;
    {} where there are none, or no PNG."""
    texts = {}
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                return {}
            while len(header := f.read(8)) == 8:
                length, kind = struct.unpack(">I4s", header)
                if kind == b"tEXt":
                    key, _, value = f.read(length).partition(b"\0")
                    texts.setdefault(key.decode("latin-1"), value.decode("latin-1"))  # the encoding of tEXt chunks
                else:
                    f.seek(length, os.SEEK_CUR)
                f.seek(4, os.SEEK_CUR)  # its CRC
    except OSError:
        return {}
    return texts


def mean_curve(runs, key):
    """The steps every run evaluated at, and at each the mean, min and max over runs of key (a list per run
    aligned with its steps); None where a run lacks key there (runs from before train_s was recorded)."""
    steps = sorted(set.intersection(*(set(r["steps"]) for r in runs)))
    values = [[dict(zip(r["steps"], r[key]))[step] for r in runs] for step in steps]
    if any(v is None for row in values for v in row):
        return None
    values = np.array(values, dtype=float)
    return steps, values.mean(axis=1), values.min(axis=1), values.max(axis=1)


def plot_val_loss(configs, path, title, published=None, published_step=None):
    """Validation loss (the random-batch estimates) against step and against training seconds: one mean curve per
    configuration (see results.configurations) with a band from the min to the max over its seeds.

    published ({name: loss}) marks the original's values at published_step with a cross of each curve's colour.
    """
    published = published or {}
    fig = Figure(figsize=(13, 5), layout="constrained")
    step_ax, time_ax = fig.subplots(1, 2, sharey=True)
    for c in configs:
        steps, loss, low, high = mean_curve(c["runs"], "val_loss")
        label = f"{c['name']} ({c['loss'].mean:.3f})"
        (line,) = step_ax.plot(steps, loss, label=label, linewidth=1.8)
        curves = [(step_ax, steps)]
        timed = mean_curve(c["runs"], "train_s")
        if timed is not None:
            time_ax.plot(timed[1], loss, color=line.get_color(), linewidth=1.8)
            curves.append((time_ax, timed[1]))
        if c["loss"].n > 1:
            for ax, x in curves:
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        if c["name"] in published:
            step_ax.plot([published_step], [published[c["name"]]], "x", color=line.get_color(), markersize=9)
    if published:
        step_ax.plot([], [], "x", color="black", label=f"published, step {published_step}")
    seeds = max(c["loss"].n for c in configs)
    if seeds > 1:
        step_ax.fill_between([], [], [], color="gray", alpha=0.2, label="min to max over seeds")
    step_ax.set(xlabel="step", ylabel="validation loss (random batches)")
    time_ax.set(xlabel="training seconds (evaluation excluded)")
    for ax in (step_ax, time_ax):
        ax.grid(alpha=0.3)
    mean = "mean of each step over seeds, " if seeds > 1 else ""
    step_ax.legend(title=f"model ({mean}exact val loss)", fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_leaderboard(configs, path, title):
    """Exact validation loss (mean, with the sample deviation over seeds as error bars) and training speed per
    configuration, best loss on top."""
    ranked = sorted(configs, key=lambda c: c["loss"].mean, reverse=True)
    names = [c["name"] for c in ranked]
    fig = Figure(figsize=(10, 1.5 + 0.3 * len(ranked)), layout="constrained")
    loss_ax, speed_ax = fig.subplots(1, 2, sharey=True)
    loss_ax.errorbar([c["loss"].mean for c in ranked], names, xerr=[c["loss"].sd or 0 for c in ranked], fmt="o",
                     color="tab:blue", capsize=3)
    loss_ax.set(xlabel="exact validation loss, nats (lower is better)")
    speed_ax.barh(names, [c["tokens_per_s"].mean if c["tokens_per_s"] else 0 for c in ranked], color="tab:orange")
    speed_ax.set(xlabel="training tokens per second (log scale)", xscale="log")
    for ax in (loss_ax, speed_ax):
        ax.grid(alpha=0.3)
    loss_ax.set_ylim(-0.5, len(ranked) - 0.5)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_rates(choices, path, title):
    """Write rates_figure(choices, title) to path."""
    save_figure(rates_figure(choices, title), path)


def rates_figure(choices, title):
    """The test-half exact loss against learning rate (log axis): one line per configuration (see
    tuning.Choice) through the mean over seeds at each rate, with the sample deviation as error bars, its
    chosen rate (lowest mean tune-half loss) marked by a star, and a rate at which every training failed by a
    cross at the top of the plot."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for choice in choices:
        tests = [c["halves"]["test"]["loss"] for c in choice.by_rate]
        line = ax.errorbar(choice.rates, [t.mean for t in tests], yerr=[t.sd or 0 for t in tests], marker="o",
                           capsize=3, label=choice.name)
        color = line.lines[0].get_color()
        chosen = choice.chosen["halves"]["test"]["loss"].mean
        ax.plot([choice.chosen["learning_rate"]], [chosen], "*", markersize=16, color=color,
                markeredgecolor="black")
        if choice.failed:  # an empty unclipped line would widen the figure's margins
            ax.plot(sorted(choice.failed), [0.97] * len(choice.failed), "x", markersize=10, markeredgewidth=2,
                    color=color, transform=ax.get_xaxis_transform(), clip_on=False)
    ax.plot([], [], "*", color="gray", markeredgecolor="black", markersize=12, label="chosen on the tune half")
    if any(choice.failed for choice in choices):
        ax.plot([], [], "x", color="gray", markersize=10, markeredgewidth=2, label="every training failed")
    ax.set(xscale="log", xlabel="learning rate (log scale)", ylabel="exact loss on the test half, nats")
    ax.grid(alpha=0.3, which="both")
    seeds = max(c["loss"].n for choice in choices for c in choice.by_rate)
    ax.legend(title="mean over seeds" + (", bars: sample deviation" if seeds > 1 else ""), fontsize=8)
    fig.suptitle(title)
    return fig


def plot_loss_by_position(configs, path, title):
    """The exact validation loss of the targets at each offset t of their windows against their characters of
    context, t + 1 (log axis): one line per configuration with a run's loss_by_position.csv
    through the mean over its seeds, with a band from the min to the max over them. Returns the names of the
    configurations left out for want of that file (drawing nothing when none has it, and removing an older
    figure at path, which would not be theirs)."""
    drawn = [c for c in configs if all(r["by_position"] for r in c["runs"])]
    if drawn:
        fig = Figure(figsize=(8, 5), layout="constrained")
        ax = fig.subplots()
        for c in drawn:
            losses = np.array([r["by_position"]["loss"] for r in c["runs"]], dtype=float)
            context = np.arange(1, losses.shape[1] + 1)
            (line,) = ax.plot(context, losses.mean(axis=0), linewidth=1.6, label=c["name"])
            if len(losses) > 1:
                ax.fill_between(context, losses.min(axis=0), losses.max(axis=0), color=line.get_color(), alpha=0.2,
                                linewidth=0)
        ax.set(xscale="log", xlabel="characters of context (offset in the window + 1, log scale)",
               ylabel="exact validation loss at that offset, nats")
        ax.grid(alpha=0.3, which="both")
        seeds = max(c["loss"].n for c in drawn)
        ax.legend(title="mean over seeds" + (", band: min to max" if seeds > 1 else ""), fontsize=8)
        fig.suptitle(title)
        save_figure(fig, path)
    else:
        Path(path).unlink(missing_ok=True)
    return [c["name"] for c in configs if c not in drawn]


GRAPH_MARKERS = "sD^vP*XhpH<>d8"  # one per graph of a graph study, in order (after 14 they repeat); circles
# stand for the positions in its legend


def plot_graph_study(configs, path, title):
    """Write graph_study_figure(configs, title) to path."""
    save_figure(graph_study_figure(configs, title), path)


def graph_study_figure(configs, title):
    """Exact validation loss (mean, with the sample deviation over seeds as error bars) against edges per token
    and against training speed, one point per configuration: a colour per model, a marker per graph, filled for
    absolute positions and hollow for relative ones, all named in a legend beside the plots (labels at the points
    would print over each other where runs lie close). A configuration without a graph (the bigram) is a dashed
    line across both."""
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    edges_ax, speed_ax = fig.subplots(1, 2, sharey=True)
    models = list(dict.fromkeys(c["model"] for c in configs))
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    graphs = list(dict.fromkeys(c["graph"] for c in configs if c["graph"] is not None))
    markers = {g: GRAPH_MARKERS[i % len(GRAPH_MARKERS)] for i, g in enumerate(graphs)}
    for c in configs:
        loss = c["loss"].mean
        if c["graph"] is None:
            for ax in (edges_ax, speed_ax):
                ax.axhline(loss, color=colors[c["model"]], linestyle="--", linewidth=1)
            continue
        style = dict(marker=markers[c["graph"]], markersize=8, color=colors[c["model"]], linestyle="none",
                     capsize=3, markerfacecolor=colors[c["model"]] if c["pos"] != "rel" else "none")
        speed = c["tokens_per_s"].mean if c["tokens_per_s"] else 0
        for ax, x in ((edges_ax, c["edges_per_token"]), (speed_ax, speed)):
            ax.errorbar(x, loss, yerr=c["loss"].sd or 0, **style)
    edges_ax.set(xlabel="edges per token (mean in-degree of a full block, log scale)", xscale="log",
                 ylabel="exact validation loss, nats")
    speed_ax.set(xlabel="training tokens per second")
    handles = [Patch(color=colors[m], label=m) for m in models
               if any(c["model"] == m and c["graph"] is not None for c in configs)]
    handles += [Line2D([], [], color=colors[c["model"]], linestyle="--", label=c["model"]) for c in configs
                if c["graph"] is None]
    handles += [Line2D([], [], color="gray", marker=markers[g], linestyle="none", label=g) for g in graphs]
    handles += [Line2D([], [], color="gray", marker="o", linestyle="none", label="absolute positions"),
                Line2D([], [], color="gray", marker="o", markerfacecolor="none", linestyle="none",
                       label="relative positions")]
    if max(c["loss"].n for c in configs) > 1:
        handles.append(Line2D([], [], color="gray", marker="|", linestyle="none",
                              label="bars: sample deviation over seeds"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    for ax in (edges_ax, speed_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def plot_attention(maps, tokens, path, title, agreement=None, drawn_from=None):
    """Heatmaps of attention maps, a list over layers of (H, T, T), with the tokens as tick labels.

    agreement (layers x heads), when given, is printed in each heatmap's title (see attention.rank_agreement).
    The PNG's Description is ATTENTION_FIGURE; drawn_from (a dict: the run and prompt it was drawn from), when
    given, goes into its DRAWN_FROM text as JSON.
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
    texts = {"Description": ATTENTION_FIGURE}
    if drawn_from is not None:
        texts[DRAWN_FROM] = json.dumps(drawn_from, sort_keys=True)
    save_figure(fig, path, texts)
