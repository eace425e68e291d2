"""Finished runs read back: trained models and summary tables."""
import json
import math
import statistics
from pathlib import Path

from .checkpoint import load_checkpoint
from .config import PRESETS, PUBLISHED_VAL_LOSS
from .data import CharTokenizer
from .errors import UsageError
from .evaluation import HALVES, has_halves, read_eval, read_loss_by_position
from .graph import parse_graph
from .mixers import DENSE_LAYERS
from .models import model_from_checkpoint
from .rundir import file_in_the_way, read_metrics, refuse_if_held, with_original_graph
from .stats import CONFIDENCE, paired_difference, spread

# the settings every preset trains with unless told: eager float32 on the original's graph and positions
PRESET_DEFAULTS = {"dtype": "float32", "compile": False, "graph": "full", "pos": "abs"}


def load_run_model(out_dir, device="cpu", backend=None):
    """The model of out_dir/ckpt.pt in eval mode on device, its tokenizer and the checkpoint's {"name", "step",
    "block_size", "rng", "data_sha256", "config"} (block_size None for the bigram, which reads one token; rng the
    random states that rank 0 of its training saved with it, train.rng_state, or None where it holds the weights
    alone; data_sha256 that of the text it was trained on, None where its training did not record it; config the
    run's config.json as its training saved it, {} where it saved none).

    backend ("fast" or "pyg") replaces the run's own for a graph layer: both hold the same parameters. A run that
    a training holds (see rundir.hold_run_dir) is refused.
    """
    if refusal := file_in_the_way(out_dir, "--out_dir"):
        raise UsageError(refusal)
    refuse_if_held(out_dir, "try again once that training has ended")
    checkpoint = load_checkpoint(Path(out_dir) / "ckpt.pt")
    overrides = {}
    if backend is not None:
        if checkpoint["model_config"].get("mixer", "attention") not in DENSE_LAYERS:
            raise UsageError(f"--backend applies to runs of {', '.join(DENSE_LAYERS[:-1])} and {DENSE_LAYERS[-1]} (the "
                             f"layers with a dense form), and {out_dir} holds a {checkpoint['name']} model; drop "
                             f"--backend")
        overrides["backend"] = backend
    path = Path(out_dir) / "ckpt.pt"
    try:
        model = model_from_checkpoint(checkpoint, **overrides)
    except Exception as e:  # noqa: BLE001 - whatever the config of another version, or a damaged one, raises
        raise UsageError(f"{path} holds a model this version cannot rebuild ({' '.join(str(e).split())[:160]}); "
                         f"retrain it with this version") from None
    if not all(t.isfinite().all() for t in checkpoint["model"].values() if t.is_floating_point()):
        raise UsageError(f"{path} holds weights that are not finite numbers (NaN or infinity); retrain it, at a lower "
                         f"--learning_rate if its loss diverged")
    model = model.to(device)
    trained = checkpoint.get("config")
    trained = trained if isinstance(trained, dict) else {}
    return model, CharTokenizer(checkpoint["vocab"]), {"name": checkpoint["name"], "step": checkpoint["step"],
                                                       "block_size": checkpoint["model_config"].get("block_size"),
                                                       "rng": (checkpoint.get("rng") or [None])[0],
                                                       "data_sha256": trained.get("data_sha256"), "config": trained}


def run_summary(out_dir, at=None):
    """What a finished run measured, from its small files alone (config.json, metrics.csv, eval.json): its seed,
    validation curve (random-batch estimates) against steps, tokens and training seconds, exact validation loss
    (None without eval.json of its last step), size, speed and machine. at: the run as it was at that step, with
    the exact evaluation its training wrote there (--exact_at)."""
    config = with_original_graph(json.loads((Path(out_dir) / "config.json").read_text()))
    if problem := config_problem(config):
        raise UsageError(f"{Path(out_dir) / 'config.json'} {problem}; restore it, or remove the run and train it "
                         f"again")
    settings = config["settings"]
    at = None if at == settings["max_iters"] else at  # the last step's evaluation is eval.json itself
    rows = [r for r in read_metrics(out_dir) if at is None or int(r["step"]) <= at]
    rates = [r["tokens_per_s"] for r in rows if r["tokens_per_s"]]
    exact = read_eval(out_dir, int(rows[-1]["step"]), at)
    check_finite_losses(out_dir, exact)
    return {
        "name": config["name"],
        "seed": config["seed"],
        "model": trained_model(config),
        "graph": settings.get("graph"),
        "pos": settings.get("pos"),
        "edges_per_token": edges_per_token(settings),
        "arch": config["arch"],
        "settings": settings,
        "steps": [int(r["step"]) for r in rows],
        "val_loss": [r["val_loss"] for r in rows],
        "train_s": [r.get("train_s") for r in rows],  # None in runs from before it was recorded
        "tokens": [r["tokens"] if r.get("tokens") is not None else
                   int(r["step"]) * settings["batch_size"] * settings["block_size"] * config.get("processes", 1)
                   for r in rows],
        "exact": exact,
        "by_position": read_loss_by_position(out_dir, at),
        "parameters": config["parameters"],
        "tokens_per_s": statistics.median(rates) if rates else None,
        "runs_at_once": config.get("runs_at_once"),  # None in runs from before it was recorded
        "wall_s": rows[-1]["elapsed_s"],
        "preset": config["preset"],
        "device": config["device"],
        "machine": config["machine"],
        "torch": versions.get("torch") if isinstance(versions := config.get("versions"), dict) else None,
    }


# what a summary reads from a run's config.json besides the settings that a comparison matches before it reads
# a run (plan.py), and of what type (exactly: a bool, an int to Python, is not one)
SUMMARY_FIELDS = {"arch": str, "parameters": int, "machine": str}


def config_problem(config):
    """What keeps a run's config.json (a dict) from being summarised ("" when nothing): the first field of
    SUMMARY_FIELDS that it lacks or holds with another type."""
    bad = next((key for key, kind in SUMMARY_FIELDS.items() if type(config.get(key)) is not kind), None)
    return "" if bad is None else f"has no {bad} of the right type"


def check_finite_losses(out_dir, exact):
    """UsageError naming the first loss of a run's exact evaluation (an eval.json record, or None) that is not a
    finite number: no mean, interval or choice of rate can be drawn from it."""
    bad = next((key for key, value in (exact or {}).items() if key.endswith(("_loss", "_bpc"))
                and not (type(value) in (int, float) and math.isfinite(value))), None)  # a bool is no loss
    if bad is not None:
        raise UsageError(f"{out_dir} has an exact {bad} that is not a finite number ({exact[bad]}); remove the run "
                         f"and train it again, at a lower --learning_rate if its loss diverges")


def configurations(summaries):
    """The runs grouped by configuration (model, graph, positions: their name; and learning rate), in order of
    first appearance, each with its runs by seed and the spread over seeds of its exact loss (nats and bits) on
    the whole validation split and, where every run has them, on each of its halves ("tune", "test"), its speed
    and time."""
    groups = {}
    for s in summaries:
        groups.setdefault((s["name"], s["settings"]["learning_rate"]), []).append(s)
    configs = []
    for runs in groups.values():
        runs = sorted(runs, key=lambda r: r["seed"])
        first = runs[0]
        configs.append({
            **{k: first[k] for k in ("name", "model", "graph", "pos", "edges_per_token", "arch", "settings",
                                      "parameters", "preset", "device", "machine")},
            "learning_rate": first["settings"]["learning_rate"],
            "runs": runs,
            "seeds": [r["seed"] for r in runs],
            "loss_by_seed": {r["seed"]: r["exact"]["val_loss"] for r in runs},
            "loss": spread(r["exact"]["val_loss"] for r in runs),
            "bpc": spread(r["exact"]["val_bpc"] for r in runs),
            "targets": first["exact"]["targets"],
            "halves": {part: half_summary(runs, part) for part in HALVES}
            if all(has_halves(r["exact"]) for r in runs) else None,
            "tokens_per_s": spread(r["tokens_per_s"] for r in runs) if all(r["tokens_per_s"] for r in runs) else None,
            "wall_s": statistics.fmean(r["wall_s"] for r in runs),
        })
    return configs


def half_summary(runs, part):
    """One half of the validation split over a configuration's runs: the loss by seed, the spread of the loss
    (nats and bits) and the half's targets."""
    return {"loss_by_seed": {r["seed"]: r["exact"][f"{part}_loss"] for r in runs},
            "loss": spread(r["exact"][f"{part}_loss"] for r in runs),
            "bpc": spread(r["exact"][f"{part}_bpc"] for r in runs),
            "targets": runs[0]["exact"][f"{part}_targets"]}


def trained_model(config):
    """The model a run's config describes: its PyG layer, gpt or bigram."""
    mixer = config["model_config"].get("mixer")
    return config["arch"] if mixer is None else "gpt" if mixer == "attention" else mixer


def edges_per_token(settings):
    """The mean in-degree of a full block under a run's graphs, averaged over layers (None for the bigram)."""
    if "graph" not in settings:
        return None
    graphs = parse_graph(settings["graph"], settings["n_layer"])
    return statistics.mean(g.edges_per_token(settings["block_size"]) for g in graphs)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


def published_val_loss(config):
    """The original's validation loss for a configuration of the paper preset of one of its four models, else
    None."""
    return PUBLISHED_VAL_LOSS.get(config["name"]) if config["preset"] == "paper" else None


def format_spread(spread, digits=4):
    """mean +- sample deviation (n), or mean (1) for one seed."""
    if spread.sd is None:
        return f"{spread.mean:.{digits}f} (1)"
    return f"{spread.mean:.{digits}f} ± {spread.sd:.{digits}f} ({spread.n})"


def format_difference(difference, digits=4):
    """The mean paired difference with its interval in brackets (none for one pair) and the number of seed pairs
    in parentheses, as format_spread gives the number of seeds."""
    if difference is None:
        return "no common seed"
    if difference.low is None:
        return f"{difference.mean:+.{digits}f} (1)"
    return (f"{difference.mean:+.{digits}f} [{difference.low:+.{digits}f}, {difference.high:+.{digits}f}] "
            f"({difference.n})")


def verdict(difference, digits=4):
    """"higher" or "lower" where the interval, as the table prints it, excludes zero, else "not distinguishable"
    (or why there is no interval); an interval that is not finite distinguishes nothing."""
    if difference is None:
        return "no common seed"
    if difference.low is None:
        return "needs 2 seeds in common"
    low, high = round(difference.low, digits), round(difference.high, digits)
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 <= high:
        return "not distinguishable"
    return "higher" if difference.mean > 0 else "lower"


def baseline_columns(config, baseline):
    """The difference from the baseline configuration (paired by seed) and its verdict; dashes for the baseline."""
    if baseline is None or config is baseline:
        return ["-", "-"]
    difference = paired_difference(config["loss_by_seed"], baseline["loss_by_seed"])
    return [format_difference(difference), verdict(difference)]


def uncertainty_notes(configs, baseline):
    """What the loss columns mean, and why a table of single seeds shows no deviation or interval."""
    notes = [f"Validation loss: the exact loss over the whole validation split ({configs[0]['targets']:,} "
             f"characters, each predicted once), in nats and in bits per character; mean ± sample standard "
             f"deviation over seeds (number of seeds)."]
    if baseline is not None:
        notes.append(f"Δ: the mean over seeds of each seed's difference in nats from {baseline['name']} trained "
                     f"with the same seed (the same batches where batch and block size agree), with its "
                     f"{CONFIDENCE:.0%} Student-t interval (number of seeds both have); a difference is called one "
                     f"only where the interval excludes zero.")
    if max(c["loss"].n for c in configs) < 2:
        notes.append("One seed per configuration: no deviation or interval can be computed from one value, so no "
                     "difference is called one; train more seeds with --seeds 3.")
    return "".join(f"- {note}\n" for note in notes)


def results_table(configs, baseline=None):
    """A markdown table with one row per configuration: exact loss over seeds, the difference from the baseline,
    parameters, speed, time, preset, device and machine.

    When a configuration has a published value (see published_val_loss), a "published" column follows the loss.
    """
    published = [published_val_loss(c) for c in configs]
    with_published = any(value is not None for value in published)
    against = [] if baseline is None else [f"Δ vs {baseline['name']} (nats) [{CONFIDENCE:.0%} CI]", "difference"]
    header = ["model", "val loss (nats)", "bits per character", *(["published"] if with_published else []),
              *against, "parameters", "tokens/s", "wall time", "preset", "device", "machine"]
    rows = []
    for c, value in zip(configs, published):
        row = [c["name"], format_spread(c["loss"]), format_spread(c["bpc"])]
        if with_published:
            row.append("-" if value is None else f"{value:.2f}")
        if baseline is not None:
            row += baseline_columns(c, baseline)
        rows.append(row + [f"{c['parameters']:,}", format_rates(c["tokens_per_s"]), format_duration(c["wall_s"]),
                           c["preset"], c["device"], c["machine"]])
    return markdown_table(header, rows)


def setting_notes(configs, ignored=()):
    """"- KEY VALUE instead of PRESET_VALUE (models)" for each setting but those ignored in which runs differ from
    their preset."""
    differences = {}  # key -> (value, preset value) -> names
    for c in configs:
        preset = {**PRESET_DEFAULTS, **PRESETS[c["preset"]][c["arch"]]}
        for key, value in c["settings"].items():
            if value != preset.get(key) and key not in ignored:
                differences.setdefault(key, {}).setdefault((value, preset.get(key)), []).append(c["name"])
    every_model = list(dict.fromkeys(c["name"] for c in configs))

    def which(key, names):
        """The models named, or all of them (that have the setting), or all but the fewer left out."""
        names = list(dict.fromkeys(names))
        holders = [name for name in every_model if any(key in c["settings"] for c in configs if c["name"] == name)]
        others = [name for name in holders if name not in names]
        if not others:
            return "all models" if names == every_model else "all models that have it"
        return f"all models but {', '.join(others)}" if len(others) < len(names) else ", ".join(names)

    return [f"- {key} {value} instead of {preset_value} ({which(key, names)})"
            for key, variants in differences.items() for (value, preset_value), names in variants.items()]


def leaderboard_table(configs):
    """A markdown table of configurations ranked by mean exact validation loss, with their training speed."""
    ranked = sorted(configs, key=lambda c: c["loss"].mean)
    return markdown_table(["rank", "model", "val loss (nats)", "bits per character", "tokens/s", "parameters"], [
        [rank, c["name"], format_spread(c["loss"]), format_spread(c["bpc"]), format_rates(c["tokens_per_s"]),
         f"{c['parameters']:,}"]
        for rank, c in enumerate(ranked, 1)
    ])


def target_table(configs, target):
    """When each configuration's validation curve (the random-batch estimates) first reached target: steps,
    tokens and training seconds, each the mean ± sample deviation over seeds (n/a for runs from before training
    seconds were recorded), or "not reached" (by how many seeds)."""
    rows = []
    for c in configs:
        reached = [first_reaching(r, target) for r in c["runs"]]
        if all(reached):
            cells = [format_mean_and_deviation(spread(r[key] for r in reached), digits)
                     if all(r[key] is not None for r in reached) else "n/a"
                     for key, digits in (("step", 0), ("tokens", 0), ("train_s", 1))]
        else:
            missed = sum(r is None for r in reached)
            cells = [f"not reached ({missed} of {len(reached)} seeds)" if missed < len(reached) else "not reached"] * 3
        rows.append([c["name"], *cells])
    return markdown_table(["model", f"steps to val loss {target}", "tokens", "training seconds"], rows)


def first_reaching(run, target):
    """The step, tokens and training seconds of the run's first evaluation at or below target, or None."""
    for step, loss, tokens, train_s in zip(run["steps"], run["val_loss"], run["tokens"], run["train_s"]):
        if loss <= target:
            return {"step": step, "tokens": tokens, "train_s": train_s}
    return None


def format_rate(tokens_per_s):
    return "n/a" if tokens_per_s is None else f"{tokens_per_s:,.0f}"


def format_rates(rates):
    """The tokens/s of a configuration's seeds (a Spread, or None): mean ± sample deviation, or the mean."""
    return "n/a" if rates is None else format_mean_and_deviation(rates, 0)


def format_mean_and_deviation(values, digits):
    """A Spread as mean ± sample deviation with thousands separated, or the mean alone for one seed."""
    return f"{values.mean:,.{digits}f}" + ("" if values.sd is None else f" ± {values.sd:,.{digits}f}")


def format_duration(seconds):
    if seconds < 60:
        return f"{seconds:.1f}s"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


NEAR = (8, 16)  # the graph study's table gives the loss at these offsets of the windows, and over their second half


def position_ranges(block_size):
    """The ranges of offsets (start, end) the graph study's table averages: 8 to 15, and the window's second half."""
    return [NEAR, (block_size // 2, block_size)]


def graph_study_table(configs, baseline=None):
    """A markdown table of configurations on context graphs: edges per token, exact loss over seeds, the
    difference from the baseline, the loss at offsets 8 to 15 and over the windows' second half (where runs have
    loss_by_position.csv), and speed."""
    ranked = sorted(configs, key=lambda c: (c["model"], c["edges_per_token"] or 0, c["pos"] or ""))
    against = [] if baseline is None else [f"Δ vs {baseline['name']} (nats) [{CONFIDENCE:.0%} CI]", "difference"]
    by_position = any(r["by_position"] for c in configs for r in c["runs"])  # else no column: runs from before
    header = ["model", "graph", "positions", "edges per token", "val loss (nats)", "bits per character", *against,
              *(["at offsets 8–15", "at the window's second half"] if by_position else []), "tokens/s", "parameters"]
    return markdown_table(header, [
        [c["model"], c["graph"] or "-", c["pos"] or "-",
         "-" if c["edges_per_token"] is None else f"{c['edges_per_token']:.1f}", format_spread(c["loss"]),
         format_spread(c["bpc"]), *([] if baseline is None else baseline_columns(c, baseline)),
         *([format_position_loss(c, *r) for r in position_ranges(c["settings"]["block_size"])] if by_position
           else []),
         format_rates(c["tokens_per_s"]), f"{c['parameters']:,}"]
        for c in ranked
    ])


def range_loss_by_seed(config, start, end):
    """{seed: the exact loss of the targets at offsets start .. end - 1 of its windows, weighted by their
    counts}; None where a run has no loss_by_position.csv or its windows are shorter."""
    curves = {r["seed"]: r["by_position"] for r in config["runs"]}
    if not all(curves.values()) or not all(len(curve["loss"]) >= end for curve in curves.values()):
        return None
    return {seed: sum(loss * n for loss, n in zip(c["loss"][start:end], c["targets"][start:end])) /
            sum(c["targets"][start:end]) for seed, c in curves.items()}


def format_position_loss(config, start, end):
    """The exact loss of the targets at offsets start .. end - 1 of the windows, mean over seeds; n/a where a run
    has no loss_by_position.csv or its windows are shorter."""
    by_seed = range_loss_by_seed(config, start, end)
    return "n/a" if by_seed is None else f"{statistics.fmean(by_seed.values()):.4f}"


def offset_ranges(block_size):
    """The ranges of offsets (start, end) by which a graph study pairs each configuration with its baseline:
    0 to 3, 4 to 7, 8 to 15, 16 to the window's middle and its second half, as far as the window reaches (the
    target at offset t has t + 1 characters of context)."""
    edges = sorted({min(edge, block_size) for edge in (0, 4, 8, 16, block_size // 2, block_size)})
    return list(zip(edges, edges[1:]))


def position_comparisons(configs):
    """A markdown table of each configuration's loss over ranges of offsets minus that of the configuration it is
    compared with (comparison_pairs), paired by seed, with its interval; "" where no pair has loss_by_position.csv
    in both. Pairs whose windows differ from the first pair's are left out."""
    pairs = comparison_pairs(configs)
    if not pairs:
        return ""
    block_size = pairs[0][0]["settings"]["block_size"]
    ranges = offset_ranges(block_size)
    by_range = {}

    def losses(config):
        if config["name"] not in by_range:
            by_range[config["name"]] = [range_loss_by_seed(config, *r) for r in ranges]
        return by_range[config["name"]]

    rows = []
    for c, ref in pairs:
        if {c["settings"]["block_size"], ref["settings"]["block_size"]} != {block_size} or \
                None in losses(c) + losses(ref):
            continue
        rows.append([c["name"], ref["name"], *(format_difference(paired_difference(v, r))
                                               for v, r in zip(losses(c), losses(ref)))])
    if not rows:
        return ""
    header = ["configuration", "against",
              *(f"offset {a}" if b == a + 1 else f"offsets {a}–{b - 1}" for a, b in ranges)]
    return (f"Loss by offset in the window, each configuration against the one it is compared with: the exact loss "
            f"of the targets at those offsets (the target at offset t has the t + 1 characters up to it as context), "
            f"each seed's difference from the other configuration trained with the same seed, mean with its "
            f"{CONFIDENCE:.0%} Student-t interval (number of seeds both have; a difference only where the interval "
            f"excludes zero):\n\n"
            f"{markdown_table(header, rows)}\n")


def position_notes(configs):
    """What the graph study's columns by position mean, and which configurations lack the file behind them (""
    where no run has it: the table then has no such columns)."""
    if not any(r["by_position"] for c in configs for r in c["runs"]):
        return ""
    halves = " or ".join(f"{a} to {b - 1}" for a, b in sorted({position_ranges(c["settings"]["block_size"])[1]
                                                             for c in configs}))
    note = ("- at offsets 8–15, at the window's second half: the exact validation loss of the targets at offsets 8 "
            "to 15 of their window (9 to 16 characters of context: the target at offset t is predicted from the t + 1 "
            f"characters up to it), and at {halves} (block_size / 2 to block_size − 1), mean over seeds (each run's "
            "loss_by_position.csv); a single offset has only one target per window, too few to read alone.\n")
    missing = [c["name"] for c in configs if not all(r["by_position"] for r in c["runs"])]
    if missing:
        note += (f"- n/a: {', '.join(missing)} ha{'s' if len(missing) == 1 else 've'} runs without "
                 f"loss_by_position.csv (trained before it was written; python evaluate.py --out_dir RUN --write "
                 f"writes it from a checkpoint).\n")
    return note


def comparison_pairs(configs):
    """The (configuration, reference) pairs a graph study draws, each on the same seeds: every graph against the
    complete one (same model and positions, or the model's original, full with absolute positions, where it has
    no complete graph with the same positions), relative positions against absolute ones (same model and graph),
    and every graph layer against gpt (same graph and positions)."""
    by_key = {(c["model"], c["graph"], c["pos"]): c for c in configs if c["graph"] is not None}
    pairs = []
    for (model, graph, pos), c in by_key.items():
        complete = by_key.get((model, "full", pos)) or by_key.get((model, "full", "abs"))
        references = [("full", complete, graph != "full"),
                      ("abs", by_key.get((model, graph, "abs")), pos == "rel"),
                      ("gpt", by_key.get(("gpt", graph, pos)), model != "gpt")]
        pairs += [(kind, c, ref) for kind, ref, applies in references if applies and ref is not None]
    order = {"full": 0, "abs": 1, "gpt": 2}
    pairs.sort(key=lambda p: order[p[0]])
    return [(c, ref) for _, c, ref in pairs]


def graph_comparisons(configs, value=lambda c: c["loss_by_seed"], quantity="Δ (nats)", digits=4):
    """The paired differences of comparison_pairs as a markdown table ("" where there are none). value gives a
    configuration's {seed: value}: its exact loss unless told."""
    rows = []
    for c, ref in comparison_pairs(configs):
        difference = paired_difference(value(c), value(ref))
        rows.append([c["name"], ref["name"], format_difference(difference, digits), verdict(difference, digits)])
    if not rows:
        return ""
    return markdown_table(["configuration", "against", f"{quantity} [{CONFIDENCE:.0%} CI]", "difference"], rows)


def seconds_to_target(config, target):
    """{seed: training seconds at the run's first evaluation at or below target} over the seeds whose runs reached
    it and recorded their training seconds."""
    reached = {r["seed"]: first_reaching(r, target) for r in config["runs"]}
    return {seed: at["train_s"] for seed, at in reached.items() if at and at["train_s"] is not None}
