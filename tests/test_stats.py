"""Means, deviations and intervals over seeds, a run's speed, the graph study's tables, the choice of a learning
rate on the tune half and the time to a target loss, against computations of their own."""
import csv
import math
import random
import statistics

import numpy as np
import pytest
from scipy import stats as scipy_stats

from conftest import TINY_SIZES, t_interval, table_rows
from gnngpt import tuning
from gnngpt.cli import main
from gnngpt.config import GPT as GPT_SCRIPT
from gnngpt.plots import rates_figure
from gnngpt.results import (
    format_duration,
    graph_comparisons,
    graph_study_table,
    leaderboard_table,
    run_summary,
    target_table,
)
from gnngpt.stats import paired_difference, spread


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_a_paired_difference_is_the_students_t_interval_of_the_per_seed_differences(n):
    rng = random.Random(n)
    values = {seed: rng.gauss(1.5, 0.05) for seed in range(n + 1)}  # seed n has no baseline: left out
    baseline = {seed: rng.gauss(1.45, 0.05) for seed in range(-1, n)}  # seed -1 has no value: left out
    d = np.array([values[seed] - baseline[seed] for seed in range(n)])
    low, high = scipy_stats.t.interval(0.95, n - 1, loc=d.mean(), scale=scipy_stats.sem(d))
    difference = paired_difference(values, baseline)
    assert difference.n == n and difference.mean == pytest.approx(d.mean())
    assert (difference.low, difference.high) == pytest.approx((low, high))


def test_a_spread_is_the_mean_and_sample_deviation_of_skewed_values_and_one_value_has_no_deviation():
    values = [1.0, 1.1, 1.2, 5.0]  # skewed: the median (1.15) and the deviation over n (1.69) differ
    result = spread(iter(values))  # any iterable, read once
    assert (result.mean, result.sd, result.n) == (pytest.approx(np.mean(values)),
                                                  pytest.approx(np.std(values, ddof=1)), 4)
    assert spread([1.5]) == type(result)(1.5, None, 1)


def test_one_shared_seed_gives_a_mean_without_an_interval_and_none_gives_nothing():
    one = paired_difference({1: 1.5, 2: 1.6}, {2: 1.4, 3: 1.2})
    assert (one.mean, one.low, one.high, one.n) == (pytest.approx(0.2), None, None, 1)
    assert paired_difference({1: 1.5}, {2: 1.4}) is None


def config(name, rate, tune, test):
    """A configuration at one rate with its per-seed tune-half and test-half losses ({seed: nats})."""
    def half(by_seed):
        return {"loss_by_seed": by_seed, "loss": spread(by_seed.values()),
                "bpc": spread(v / math.log(2) for v in by_seed.values()), "targets": 50}

    whole = spread((tune[seed] + test[seed]) / 2 for seed in test)  # the whole split, of both halves
    return {"name": name, "learning_rate": rate, "parameters": 1000, "loss": whole,
            "halves": {"tune": half(tune), "test": half(test)}}


# gpt is better at 1e-3 on the tune half and at 2e-3 on the test half; GATConv the other way round
GPT = [config("gpt", 1e-3, {1: 1.40, 2: 1.42}, {1: 1.60, 2: 1.62}),
       config("gpt", 2e-3, {1: 1.50, 2: 1.52}, {1: 1.30, 2: 1.31})]
GAT = [config("GATConv", 1e-3, {1: 1.60, 2: 1.61}, {1: 1.70, 2: 1.74}),
       config("GATConv", 2e-3, {1: 1.50, 2: 1.50}, {1: 1.90, 2: 1.93})]


def test_the_rate_is_chosen_on_the_tune_half_and_reported_on_the_test_half():
    gpt, gat = tuning.choose_rates([*GPT, *GAT])
    assert gpt.chosen is GPT[0] and gat.chosen is GAT[1]  # the lower tune-half mean, whatever the test half says
    row = next(line for line in tuning.tuned_table([gpt, gat], gpt).splitlines() if line.startswith("| gpt |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "0.001" and cells[3].startswith("1.6100 ")  # gpt's test half at its chosen rate


def test_a_difference_pairs_each_model_at_its_own_chosen_rate():
    gpt, gat = tuning.choose_rates([*GPT, *GAT])
    difference = tuning.difference_on_test_half(gat, gpt)  # GATConv at 2e-3 against gpt at 1e-3, seed by seed
    assert difference.mean == pytest.approx(((1.90 - 1.60) + (1.93 - 1.62)) / 2)


def test_a_tie_on_the_tune_half_takes_the_lower_rate():
    tied = [config("gpt", 2e-3, {1: 1.5}, {1: 1.3}), config("gpt", 1e-3, {1: 1.5}, {1: 1.6})]
    assert tuning.choose_rates(tied)[0].chosen is tied[1]


def test_the_rates_figure_draws_the_test_half_and_stars_the_chosen_rate():
    gpt, gat = tuning.choose_rates([*GPT, *GAT])
    ax = rates_figure([gpt, gat], "rates").axes[0]
    for container, choice in zip(ax.containers, (gpt, gat)):
        assert list(container.lines[0].get_ydata()) == pytest.approx(
            [statistics.fmean(c["halves"]["test"]["loss_by_seed"].values()) for c in choice.by_rate])
    stars = [line for line in ax.lines if line.get_marker() == "*" and len(line.get_xdata())]
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in stars] == pytest.approx(
        [(1e-3, 1.61), (2e-3, 1.915)])


def curve(losses, seconds=(0.0, 12.5, 26.0, 39.5)):
    """A run's validation curve at steps 0, 250, 500 and 750 of 64 tokens each (seconds None: not recorded)."""
    steps = [0, 250, 500, 750]
    return {"steps": steps, "val_loss": losses, "tokens": [64 * s for s in steps],
            "train_s": list(seconds) if seconds else [None] * 4}


def test_the_time_to_a_target_loss_is_the_mean_and_deviation_over_seeds_of_each_ones_first_evaluation_at_or_below_it():
    configs = [{"name": "gpt", "runs": [curve([4.0, 2.1, 1.95, 1.8]), curve([4.0, 1.9, 1.7, 1.6])]},
               {"name": "GATConv", "runs": [curve([4.0, 2.2, 2.0, 1.9]), curve([4.0, 2.3, 2.1, 2.0])]},
               {"name": "bigram", "runs": [curve([4.0, 2.5, 2.5, 2.5]), curve([4.0, 2.4, 2.4, 2.4])]},
               {"name": "old", "runs": [curve([4.0, 1.9, 1.8, 1.7], seconds=None)]}]
    rows = table_rows(target_table(configs, 1.95))
    assert rows[0] == ["gpt", f"375 ± {statistics.stdev([500, 250]):.0f}",  # 1.95 counts
                       f"{(500 + 250) * 64 / 2:,.0f} ± {statistics.stdev([500 * 64, 250 * 64]):,.0f}",
                       f"{(26.0 + 12.5) / 2:.1f} ± {statistics.stdev([26.0, 12.5]):.1f}"]
    assert rows[1] == ["GATConv"] + ["not reached (1 of 2 seeds)"] * 3
    assert rows[2] == ["bigram"] + ["not reached"] * 3
    assert rows[3] == ["old", "250", "16,000", "n/a"]  # a run from before training seconds were recorded


@pytest.mark.parametrize("seconds,text", [(59.94, "59.9s"), (61, "1m 01s"), (3599.4, "59m 59s"),
                                          (3600, "1h 00m"), (3 * 3600 + 125, "3h 02m")])
def test_a_wall_time_reads_in_seconds_minutes_or_hours(seconds, text):
    assert format_duration(seconds) == text


def test_the_leaderboard_ranks_by_the_mean_over_seeds():
    seeds = {"A": [1.50, 1.90], "B": [1.60, 1.61], "C": [1.55, 1.75]}  # first seed: A, C, B; worst: B, C, A
    configs = [{"name": name, "loss": spread(losses), "bpc": spread(v / math.log(2) for v in losses),
                "tokens_per_s": spread([1000.0, 1200.0]), "parameters": 10} for name, losses in seeds.items()]
    rows = table_rows(leaderboard_table(configs))
    assert [row[:2] for row in rows] == [["1", "B"], ["2", "C"], ["3", "A"]]  # means 1.605, 1.65, 1.70
    for row in rows:
        bits = np.array(seeds[row[1]]) / math.log(2)
        assert row[3] == f"{bits.mean():.4f} ± {bits.std(ddof=1):.4f} (2)" and row[4] == "1,100 ± 141"


def test_a_runs_speed_is_the_median_of_its_logged_rates(in_tmp_path, tiny_text_file):
    run = in_tmp_path / "run"
    assert main(GPT_SCRIPT, ["--data", str(tiny_text_file), "--out_dir", str(run), "--max_iters", "6",
                             "--eval_interval", "2", "--eval_iters", "1", "--batch_size", "2", "--block_size", "8",
                             "--device", "cpu", *TINY_SIZES]) == 0
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    rates = [100.0, 110.0, 400.0]  # skewed: the mean (203.3) is not the median
    assert [bool(r["tokens_per_s"]) for r in rows] == [False, True, True, True]  # steps 0 (untimed), 2, 4 and 6
    for row, rate in zip(rows[1:], rates, strict=True):
        row["tokens_per_s"] = rate
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert run_summary(run)["tokens_per_s"] == np.median(rates)


def graph_config(model, graph, pos, edges, losses, curves):
    """A graph-study configuration of block 32 with its exact loss and its loss_by_position curve per seed."""
    name = model if (graph, pos) == ("full", "abs") else f"{model}_{graph.replace(':', '-')}_{pos}"
    return {"name": name, "model": model, "graph": graph, "pos": pos, "edges_per_token": edges,
            "settings": {"block_size": 32}, "loss_by_seed": losses, "loss": spread(losses.values()),
            "bpc": spread(v / math.log(2) for v in losses.values()), "tokens_per_s": None, "parameters": 10,
            "runs": [{"seed": seed, "by_position": curve} for seed, curve in curves.items()]}


def position_curve(rng):
    return {"loss": [rng.uniform(1.0, 3.0) for _ in range(32)], "targets": [rng.randint(1, 9) for _ in range(32)]}


def test_a_graph_studys_table_pairs_each_configuration_with_the_baseline_and_averages_its_ranges_over_seeds():
    rng = random.Random(0)
    seeds = (1, 2, 3)
    configs = [graph_config("gpt", "full", "abs", 16.5, {1: 1.60, 2: 1.62, 3: 1.70},
                            {s: position_curve(rng) for s in seeds}),
               graph_config("gpt", "window:2", "abs", 2.0, {1: 1.70, 2: 1.73, 3: 1.82},
                            {s: position_curve(rng) for s in seeds})]
    full, window = configs
    rows = {row[1]: row for row in table_rows(graph_study_table(configs, full))}
    d = np.array([window["loss_by_seed"][s] - full["loss_by_seed"][s] for s in seeds])  # 0.10, 0.11, 0.12
    low, high = t_interval(d)
    assert rows["window:2"][6:8] == [f"{d.mean():+.4f} [{low:+.4f}, {high:+.4f}] (3)", "higher"]
    assert rows["full"][6:8] == ["-", "-"]
    for graph, c in (("full", full), ("window:2", window)):
        for cell, (a, b) in zip(rows[graph][8:10], ((8, 16), (16, 32))):
            by_seed = [np.average(r["by_position"]["loss"][a:b], weights=r["by_position"]["targets"][a:b])
                       for r in c["runs"]]
            assert cell == f"{np.mean(by_seed):.4f}"


def test_a_graph_study_pairs_every_graph_with_the_complete_one_then_positions_then_gpt_each_in_study_order():
    losses = {1: 1.6, 2: 1.7}
    configs = [graph_config(model, graph, pos, 1.0, losses, {}) for model, graph, pos in
               (("GATConv", "window:2", "rel"), ("gpt", "window:2", "abs"), ("gpt", "full", "rel"),
                ("GATConv", "full", "abs"), ("gpt", "full", "abs"), ("GATConv", "window:2", "abs"))]
    rows = [row[:2] for row in table_rows(graph_comparisons(configs))]
    assert rows == [["GATConv_window-2_rel", "GATConv"],  # no complete graph with rel: the original
                    ["gpt_window-2_abs", "gpt"], ["GATConv_window-2_abs", "GATConv"],  # graphs against full
                    ["GATConv_window-2_rel", "GATConv_window-2_abs"], ["gpt_full_rel", "gpt"],  # rel against abs
                    ["GATConv", "gpt"], ["GATConv_window-2_abs", "gpt_window-2_abs"]]  # graph layers against gpt
