"""The figures read well: in a graph study no text is printed over another, the loss by position is drawn against
each target's characters of context, and the machine is named as the README names it."""
import itertools

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from gnngpt import plots
from gnngpt.cli import machine_description
from gnngpt.plots import (
    GRAPH_MARKERS,
    graph_study_figure,
    plot_leaderboard,
    plot_loss_by_position,
    plot_val_loss,
    rates_figure,
)
from gnngpt.stats import Spread
from gnngpt.tuning import Choice

# (model, graph, positions, edges per token, val loss, tokens/s) of runs that lie close together in the
# committed graph study: two dilated:16:4 runs at the same edges per token and almost the same loss, sink:4:16
# beside window:16; and a bigram, drawn as a line
CLOSE_RUNS = [
    ("GATv2Conv", "dilated:16:4", "abs", 14.1, 2.4825, 8968),
    ("GATv2Conv", "dilated:16:4", "rel", 14.1, 2.4795, 5203),
    ("GATv2Conv", "window:16", "abs", 15.5, 2.3337, 18796),
    ("GATv2Conv", "sink:4:16", "abs", 19.3, 2.3374, 18406),
    ("gpt", "window:16", "rel", 15.5, 1.9550, 25623),
    ("gpt", "sink:4:16", "rel", 19.3, 2.0047, 24697),
    ("gpt", "full", "abs", 128.5, 2.3219, 26438),
    ("bigram", None, None, None, 2.4904, 1_476_400),
]


def drawn_texts(fig):
    """The texts a drawn figure shows: titles, labels, legend entries and the tick labels within each axis's view."""
    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            hidden |= {id(label) for tick in axis.get_major_ticks() + axis.get_minor_ticks()
                       if not low <= tick.get_loc() <= high for label in (tick.label1, tick.label2)}
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and id(t) not in hidden]


def test_graph_study_prints_no_text_over_another_and_gives_each_graph_its_marker():
    configs = [dict(model=m, graph=g, pos=p, edges_per_token=e, loss=Spread(loss, 0.01, 3),
                    tokens_per_s=Spread(rate, 100.0, 3)) for m, g, p, e, loss, rate in CLOSE_RUNS]
    fig = graph_study_figure(configs, "Context graphs (preset cpu, 2-core x86_64 CPU, 1 torch thread)")
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    texts = drawn_texts(fig)
    labels = [t.get_text() for t in texts]
    assert [labels.count(graph) for graph in ("dilated:16:4", "window:16", "sink:4:16", "full")] == [1, 1, 1, 1]
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    assert [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2) if box_a.overlaps(box_b)] == []
    legend = fig.legends[0].get_window_extent(renderer)
    assert not any(legend.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)

    graphs = list(dict.fromkeys(g for _, g, *_ in CLOSE_RUNS if g))
    for ax in fig.axes:
        points = {line.get_ydata()[0]: line for line in ax.lines if line.get_marker() != "None"}
        for _, graph, pos, _, loss, _ in CLOSE_RUNS[:-1]:
            assert points[loss].get_marker() == GRAPH_MARKERS[graphs.index(graph)]
            assert (points[loss].get_markerfacecolor() == "none") == (pos == "rel")
        assert [line.get_linestyle() for line in ax.lines if line.get_marker() == "None"] == ["--"]  # the bigram
    assert len(set(GRAPH_MARKERS)) == len(GRAPH_MARKERS) and "o" not in GRAPH_MARKERS  # circles: the positions


def test_graph_study_draws_each_configuration_at_its_edges_per_token_and_at_its_speed():
    configs = [dict(model=m, graph=g, pos=p, edges_per_token=e, loss=Spread(loss, 0.01, 3),
                    tokens_per_s=Spread(rate, 100.0, 3)) for m, g, p, e, loss, rate in CLOSE_RUNS[:-1]]
    edges_ax, speed_ax = graph_study_figure(configs, "title").axes
    for ax, column in ((edges_ax, 3), (speed_ax, 5)):
        points = sorted((line.get_xdata()[0], line.get_ydata()[0]) for line in ax.lines
                        if line.get_marker() in GRAPH_MARKERS)  # not the caps of the error bars
        assert points == sorted((run[column], run[4]) for run in CLOSE_RUNS[:-1])


def drawn(monkeypatch):
    """The figures the plots module saves from now on, instead of writing them."""
    saved = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: saved.append(fig))
    return saved


def test_the_validation_curve_is_the_mean_over_seeds_against_steps_and_against_training_seconds(tmp_path,
                                                                                                monkeypatch):
    saved = drawn(monkeypatch)
    runs = [{"steps": [0, 100, 200], "val_loss": [4.0, 2.5, 2.0], "train_s": [0.0, 10.0, 22.0]},
            {"steps": [0, 100, 200], "val_loss": [4.2, 2.1, 1.9], "train_s": [0.0, 12.0, 20.0]},
            {"steps": [0, 100, 200], "val_loss": [4.1, 2.9, 2.4], "train_s": [0.0, 14.0, 30.0]}]
    config = dict(name="gpt", loss=Spread(1.9, 0.1, 3), runs=runs)
    plot_val_loss([config], tmp_path / "val_loss.png", "title", published={"gpt": 1.5}, published_step=5000)
    step_ax, time_ax = saved[0].axes
    curve, cross = step_ax.lines[:2]
    assert list(curve.get_xdata()) == [0, 100, 200]
    assert list(curve.get_ydata()) == pytest.approx([4.1, 2.5, 2.1])  # the mean, not the best seed
    (timed,) = time_ax.lines
    assert list(timed.get_xdata()) == pytest.approx([0.0, 12.0, 24.0]) and list(timed.get_ydata()) == pytest.approx(
        [4.1, 2.5, 2.1])
    assert (list(cross.get_xdata()), list(cross.get_ydata()), cross.get_marker()) == ([5000], [1.5], "x")
    assert (step_ax.get_xlabel(), time_ax.get_xlabel()) == ("step", "training seconds (evaluation excluded)")


def test_the_leaderboard_puts_the_lowest_mean_loss_on_top_and_draws_each_ones_speed(tmp_path, monkeypatch):
    saved = drawn(monkeypatch)
    configs = [dict(name=name, loss=Spread(loss, 0.01, 2), tokens_per_s=Spread(rate, 10.0, 2))
               for name, loss, rate in (("A", 1.7, 1000.0), ("B", 1.5, 3000.0), ("C", 1.6, 2000.0))]
    plot_leaderboard(configs, tmp_path / "leaderboard.png", "title")
    loss_ax, speed_ax = saved[0].axes
    rows = sorted(loss_ax.lines[0].get_xydata().tolist(), key=lambda point: -point[1])  # top row first
    assert [loss for loss, _ in rows] == [1.5, 1.6, 1.7]
    labels = {tick.get_text(): tick.get_position()[1] for tick in loss_ax.get_yticklabels()}
    assert sorted(labels, key=labels.get, reverse=True) == ["B", "C", "A"]
    bars = sorted(speed_ax.patches, key=lambda bar: -bar.get_y())
    assert [bar.get_width() for bar in bars] == [3000.0, 2000.0, 1000.0]


def test_the_loss_by_position_is_drawn_against_characters_of_context_from_offset_0_on(tmp_path, monkeypatch):
    saved = drawn(monkeypatch)
    curves = [[2.5, 2.2, 2.0, 1.9, 1.9], [2.7, 2.4, 2.0, 1.7, 1.5]]  # offsets 0 to 4 of two seeds' windows
    config = dict(name="gpt", loss=Spread(1.9, 0.1, 2), runs=[{"by_position": {"loss": c}} for c in curves])
    assert plot_loss_by_position([config], tmp_path / "loss_by_position.png", "title") == []
    (ax,) = saved[0].axes
    (line,) = ax.lines
    # the target at offset t is predicted from the t + 1 characters of its window up to t: offset 0 from one
    assert list(line.get_xdata()) == [1, 2, 3, 4, 5]
    assert list(line.get_ydata()) == pytest.approx([2.6, 2.3, 2.0, 1.8, 1.7])
    assert ax.get_xlabel() == "characters of context (offset in the window + 1, log scale)"


def test_each_rate_is_drawn_at_its_test_half_mean_with_its_sample_deviation_as_bars():
    by_rate = [{"learning_rate": rate, "loss": Spread(2.0, 0.1, n), "halves": {"test": {"loss": Spread(mean, sd, n)}}}
               for rate, mean, sd, n in ((5e-4, 1.9, 0.02, 3), (1e-3, 1.8, 0.05, 3), (2e-3, 1.85, None, 1))]
    container = rates_figure([Choice("gpt", by_rate, by_rate[1])], "rates").axes[0].containers[0]
    assert list(container.lines[0].get_ydata()) == [1.9, 1.8, 1.85]
    (bars,) = container.lines[2]
    assert [tuple(segment[:, 1]) for segment in bars.get_segments()] == pytest.approx(
        [(1.88, 1.92), (1.75, 1.85), (1.85, 1.85)])  # one seed: no deviation, no bar


def test_a_rate_whose_every_training_failed_is_a_cross_on_its_models_colour():
    def at(rate, loss):
        return {"learning_rate": rate, "loss": Spread(loss, 0.01, 2),
                "halves": {"test": {"loss": Spread(loss, 0.01, 2)}}}

    gpt = [at(1e-3, 1.9), at(2e-3, 1.8)]
    choices = [Choice("gpt", gpt, gpt[1], {4e-3: 1, 5e-4: 1}), Choice("GATConv", [at(1e-3, 2.0)], at(1e-3, 2.0))]
    ax = rates_figure(choices, "rates").axes[0]
    crosses = [line for line in ax.lines if line.get_marker() == "x" and len(line.get_xdata())]
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [5e-4, 4e-3]
    assert crosses[0].get_color() == ax.containers[0].lines[0].get_color()  # gpt's
    assert "every training failed" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "every training failed" not in [t.get_text() for t in rates_figure(choices[1:], "rates").axes[0]
                                           .get_legend().get_texts()]
    for fig in (rates_figure(choices, "rates"), rates_figure(choices[1:], "rates")):
        fig.draw_without_rendering()  # lays the figure out: the axes fill it, with or without a cross
        box = fig.axes[0].get_position()
        assert box.x0 < 0.12 and box.y0 < 0.15, box


@pytest.mark.parametrize("threads,description", [(1, "2-core x86_64 CPU, 1 torch thread"),
                                                 (2, "2-core x86_64 CPU, 2 torch threads")])
def test_a_cpu_is_named_by_its_cores_and_architecture_as_in_the_readme(threads, description, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert machine_description(torch.device("cpu")) == description
