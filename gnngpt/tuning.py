"""A learning rate per model: each configuration's rate chosen on the validation split's first half ("tune"),
its result reported on the second ("test"), so that the reported number never saw the choice."""
import statistics
from dataclasses import dataclass, field

from .results import format_difference, format_spread, markdown_table, verdict
from .stats import CONFIDENCE, paired_difference

EDGE_NOTE = "at the edge of the grid: try further"


@dataclass
class Choice:
    """One configuration (model, graph, positions) over its grid of learning rates: its configurations (see
    results.configurations) in order of rate, the one whose mean tune-half loss over its seeds is lowest, and the
    rates of its grid at which no run finished ({rate: the exit code of its failed training})."""

    name: str
    by_rate: list
    chosen: dict
    failed: dict = field(default_factory=dict)

    @property
    def rates(self):
        """The rates with finished runs."""
        return [c["learning_rate"] for c in self.by_rate]

    @property
    def grid(self):
        """Every rate planned, finished or failed."""
        return sorted([*self.rates, *self.failed])

    @property
    def edge(self):
        """"lowest" or "highest" where the chosen rate is the lowest or highest of a grid of several rates that
        finished (the best may lie beyond it), else None. A higher rate whose every training failed ends the
        search upwards, as a rate too large to train; a lower one that failed measured nothing."""
        rates, chosen = self.rates, self.chosen["learning_rate"]
        if len(self.grid) < 2:
            return None
        if chosen == rates[0]:
            return "lowest"
        return "highest" if chosen == rates[-1] and not any(rate > chosen for rate in self.failed) else None


def choose_rates(configs, failed=None):
    """A Choice per configuration name, in order of first appearance: of its configurations at each learning
    rate, the one with the lowest mean tune-half loss over the seeds that every rate has (the lower rate on a tie;
    over each rate's own seeds where the rates share none). Every configuration needs the halves of the
    validation split (results.configurations' "halves"). failed: {name: {rate: exit code}}, the rates of each
    grid at which every training failed."""
    names = list(dict.fromkeys(c["name"] for c in configs))
    choices = []
    for name in names:
        by_rate = sorted((c for c in configs if c["name"] == name), key=lambda c: c["learning_rate"])
        seeds = set.intersection(*seed_sets(by_rate))
        chosen = min(by_rate, key=lambda c: (tune_loss(c, seeds), c["learning_rate"]))
        choices.append(Choice(name, by_rate, chosen, (failed or {}).get(name, {})))
    return choices


def seed_sets(by_rate):
    """The seeds of each configuration of a grid, as sets."""
    return [set(c["halves"]["tune"]["loss_by_seed"]) for c in by_rate]


def tune_loss(config, seeds):
    """The mean tune-half loss of a configuration over seeds (over all of its own where seeds is empty)."""
    by_seed = config["halves"]["tune"]["loss_by_seed"]
    return statistics.fmean(by_seed[seed] for seed in seeds or by_seed)


def format_rate(rate):
    return f"{rate:g}"


def difference_on_test_half(choice, baseline):
    """The paired difference (same seeds) of the test-half loss of a choice from the baseline's, each at its own
    chosen rate."""
    return paired_difference(choice.chosen["halves"]["test"]["loss_by_seed"],
                             baseline.chosen["halves"]["test"]["loss_by_seed"])


def tuned_table(choices, baseline=None):
    """One row per configuration at its chosen learning rate: the rate, the grid of rates (its failed ones marked,
    and flagged where the rate lies at its edge), the test-half loss over seeds in nats and bits per character,
    and the paired difference from the baseline at the baseline's own chosen rate with its interval and verdict."""
    against = [] if baseline is None else [f"Δ vs {baseline.name} (nats) [{CONFIDENCE:.0%} CI]", "difference"]
    header = ["model", "learning rate", "grid", "test loss (nats)", "bits per character", *against, "parameters"]
    rows = []
    for choice in choices:
        test = choice.chosen["halves"]["test"]
        row = [choice.name, format_rate(choice.chosen["learning_rate"]),
               ", ".join(format_rate(r) + (" (failed)" if r in choice.failed else "") for r in choice.grid)
               + (f" ({EDGE_NOTE})" if choice.edge else ""),
               format_spread(test["loss"]), format_spread(test["bpc"])]
        if baseline is not None:
            if choice is baseline:
                row += ["-", "-"]
            else:
                difference = difference_on_test_half(choice, baseline)
                row += [format_difference(difference), verdict(difference)]
        rows.append(row + [f"{choice.chosen['parameters']:,}"])
    return markdown_table(header, rows)


def rate_table(choices):
    """Every configuration at every learning rate: the tune-half and test-half losses over seeds, and which rate
    was chosen; a rate at which every training failed, with its exit code."""
    rows = []
    for choice in choices:
        finished = dict(zip(choice.rates, choice.by_rate))
        for rate in choice.grid:
            if rate in choice.failed:
                rows.append([choice.name, format_rate(rate), "-", "-", "-",
                             f"training failed (exit code {choice.failed[rate]})"])
                continue
            c = finished[rate]
            halves = c["halves"]
            rows.append([choice.name, format_rate(rate), format_spread(halves["tune"]["loss"]),
                         format_spread(halves["test"]["loss"]), format_spread(c["loss"]),
                         "chosen" if c is choice.chosen else ""])
    return markdown_table(["model", "learning rate", "tune loss (nats)", "test loss (nats)",
                           "whole validation loss (nats)", ""], rows)


def tuning_notes(choices, baseline):
    """What the tuned table's columns mean: the halves, the selection, the pairing and the grid's edges."""
    halves = choices[0].chosen["halves"]
    notes = [f"Each configuration trains at every learning rate of its grid with every seed; the rate with the "
             f"lowest mean exact loss over its seeds on the validation split's first half (tune: "
             f"{halves['tune']['targets']:,} characters) is chosen, and the table reports, at that rate, the exact "
             f"loss on the second half (test: {halves['test']['targets']:,} characters), which the choice never "
             f"saw: mean ± sample standard deviation over seeds (number of seeds)."]
    if baseline is not None:
        notes.append(f"Δ: the mean over seeds of each seed's test-half difference in nats from {baseline.name}, each "
                     f"at its own chosen rate and trained with the same seed, with its {CONFIDENCE:.0%} Student-t "
                     f"interval (number of seeds both have); a difference is called one only where the interval "
                     f"excludes zero.")
    uneven = [c.name for c in choices if len({frozenset(seeds) for seeds in seed_sets(c.by_rate)}) > 1]
    if uneven:
        notes.append(f"Not every rate has every seed for {', '.join(uneven)} (a training failed): their rates are "
                     f"compared over the seeds all of them have, or over each rate's own where they share none, "
                     f"so the tune losses below, over each rate's own seeds, may rank them otherwise.")
    lost = [c for c in choices if c.failed]
    if lost:
        notes.append("Rates at which every training failed, so that the choice could not weigh them: " + ", ".join(
            f"{c.name} ({', '.join(map(format_rate, sorted(c.failed)))})" for c in lost)
            + "; a failed rate above the chosen one ends the grid upwards (as a rate too large to train), so the "
            "choice is not flagged as at the top of its grid.")
    edges = [c for c in choices if c.edge]
    if edges:
        notes.append("Chosen at the edge of the grid, where a better rate may lie beyond it: " + ", ".join(
            f"{c.name} ({format_rate(c.chosen['learning_rate'])}, the {c.edge})" for c in edges)
            + "; add the next rate on that side (the same command with a longer list trains only the new runs).")
    return "".join(f"- {note}\n" for note in notes)
