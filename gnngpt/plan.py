"""The runs of a comparison (compare.py): every model of --models on every (graph, positions) pair of --graphs and
--pos with every seed, each checked as its training script would check it, and the state of its run directory."""
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cli, guard
from .checkpoint import readable_checkpoint
from .config import SCRIPTS, Script, script_for
from .data import DEFAULT_DATA, load_text, text_digest
from .errors import UsageError, check_count
from .evaluation import read_eval
from .files import atomic_name_length
from .lists import list_items, refuse_twice
from .mixers import parse_layer_kwargs
from .models import GPTConfig
from .rundir import (
    has_checkpoint,
    has_final_files,
    holds_run,
    is_finished,
    name_limit,
    nearest_existing,
    read_config,
    refuse_if_held,
    run_name,
    stopped_before_first_checkpoint,
)

DEFAULT_MODELS = "bigram,gpt,GATConv,GATv2Conv"
ALL_LAYERS = "all-layers"
# compare.py decides these itself; each run's W&B run is named after the run
NOT_PASSED = ("--out_dir", "--gat_version", "--gnn", "--resume", "--list_layers", "--wandb_run_name")


@dataclass
class Run:
    """One training run of a configuration (a model on a graph with positions), a learning rate and a seed: its
    script, its arguments, and the config a reusable run must have. Its name is its directory's: the
    configuration's name, the rate where compare.py was given rates, and the seed, as in gpt_s1337 or
    gpt_lr0.001_s1337."""
    name: str
    config_name: str
    seed: int
    script: Script
    argv: list
    out_dir: Path
    expected: dict

    def state(self):
        """"reuse" a finished run with these settings (with its checkpoint, or the readable exact loss and the sample
        made from it), "resume" an unfinished one, "restart" one that stopped before its first checkpoint, start a
        "new" one, "replace" one of other settings, or one of these settings that "lost" what it needs to go on.

        A run that a training holds is refused."""
        refuse_if_held(self.out_dir, "wait for it to end or pass --runs DIR to compare elsewhere")
        if not holds_run(self.out_dir):
            return "new"
        config = read_config(self.out_dir)
        same = config is not None and not value_differences(config, self.expected)
        checkpointed = has_checkpoint(self.out_dir)
        if same and is_finished(self.out_dir, config) and (checkpointed or self.kept_without_checkpoint()):
            return "reuse"
        if same and checkpointed:
            return "resume" if readable_checkpoint(self.out_dir / "ckpt.pt") else "lost"
        if same and stopped_before_first_checkpoint(self.out_dir):
            return "restart"
        return "lost" if same else "replace"

    def kept_without_checkpoint(self):
        """Whether the run's directory holds its sample and a readable exact loss of its last step: all that a finished
        run is reused for, where no checkpoint could make them again."""
        last = self.expected["settings"]["max_iters"]
        return has_final_files(self.out_dir) and read_eval(self.out_dir, last) is not None

    def differences(self):
        """"key was X, now Y" for each value of the run in its directory that differs from this run's (none where
        that run has no readable config.json)."""
        config = read_config(self.out_dir)
        return [] if config is None else value_differences(config, self.expected)


def value_differences(config, expected):
    """"key was X, now Y" for each value of expected that config does not hold; nested dicts are compared key by
    key. A run from before its training recorded data_sha256 is compared without it."""
    differences = []
    for key, value in expected.items():
        if key == "data_sha256" and key not in config:
            continue
        if isinstance(value, dict):
            differences += value_differences(config.get(key, {}), value)
        elif config.get(key) != value:
            differences.append(f"{key} was {config.get(key)}, now {value}")
    return differences


def plan_comparison(args, extra, out):
    """The runs of compare.py's args (in the order of --models, graphs, positions, rates and seeds),
    checked before anything trains, with extra the training flags passed through and out the report's folder; the
    baseline (see baseline_name), the layer_support records of all-layers (None without it), the (graph, positions)
    pairs and the text (see comparison_text), whose SHA-256 the runs are matched to."""
    names, layer_records = model_names(args.models)
    pairs = cli.placement_list(args.graphs, args.pos)
    cli.refuse_placing_without_a_mixer(pairs, args.models, any(script_for(name).has_model_size for name in names))
    seeds = seed_list(args.seed, args.seeds)
    grids = rate_grids(args.learning_rate, names)
    if grids and max(map(len, grids.values())) > 1 and (layer_records is not None or len(pairs) > 1):
        raise UsageError("several learning rates compare models on one graph with one kind of positions; a graph "
                         "study or a leaderboard trains at one rate: give one rate per model, or one graph")
    passed = pass_through_flags(extra)
    text = comparison_text(args.data, args.report_only)
    digest = None if text is None else text_digest(text)
    runs = []
    for name in names:
        placed = [[plan_run(name, graph, pos, seed, args, passed[script_for(name)], digest, rate)  # checks all first
                   for rate in (grids[name] if grids else [None]) for seed in seeds]
                  for graph, pos in placements(name, pairs)]
        cli.refuse_twice_placed([(p[0].expected["settings"].get("graph"), p[0].expected["settings"].get("pos"))
                                 for p in placed], args.graphs, args.pos)
        runs += [r for p in placed for r in p]
    refuse_long_run_names(runs, args.runs, out)
    baseline = baseline_name(args.baseline, [r.config_name for r in runs])
    return runs, baseline, layer_records, pairs, text


def refuse_long_run_names(runs, root, out):
    """UsageError when a name that a run gives a file, named for its configuration (rundir.run_name), would be
    longer than its file system allows: its folder's under --runs root, or the one that the report writes beside its
    sample in --out's model_outputs/, <configuration>.txt (files.atomic_name_length)."""
    for directory, length in ((root, lambda run: len(os.fsencode(run.out_dir.name))),
                              (Path(out) / "model_outputs", lambda run: atomic_name_length(f"{run.config_name}.txt"))):
        limit = name_limit(nearest_existing(Path(directory).absolute()))
        longest = max(runs, key=length, default=None)
        if limit and longest and length(longest) > limit:
            raise UsageError(f"the run {longest.out_dir.name} would write names longer than the {limit} bytes its "
                             f"file system allows; shorten --graphs (a run's name holds its graph, every layer's in a "
                             f"per-layer list)")


def seed_list(seed, count):
    """The seeds of --seed (one, or a comma-separated list) and --seeds N (N seeds from one --seed)."""
    try:
        seeds = [int(s) for s in list_items(seed, "--seed", "1337,1338,1339")]
    except ValueError:
        raise UsageError(f"--seed {seed!r} is not an integer or a comma-separated list of integers") from None
    check_count("--seeds", count)
    if len(seeds) > 1 and count != 1:
        raise UsageError(f"--seeds {count} and a list in --seed {seed} exclude each other; give one of them")
    refuse_twice(seeds, f"--seed {seed!r}", lambda s: f"seed {s}")
    if len(seeds) == 1 and count > 1 and seeds[0] + count - 1 >= 2**63:
        raise UsageError(f"--seed {seeds[0]} and --seeds {count} go up to seed {seeds[0] + count - 1}, past 2**63 - 1; "
                         f"choose a lower --seed")
    return seeds if len(seeds) > 1 else [seeds[0] + i for i in range(count)]


def rate_grids(values, names):
    """The learning rates each model trains at, from compare.py's --learning_rate flags (None without any): a
    list RATE,... for every model, MODEL=RATE,... for one, which replaces the list for it; a model named in none
    trains at its preset's rate (its grid: [None])."""
    if not values:
        return None
    shared, own = [None], {}
    for value in values:
        model, equals, rates = value.rpartition("=")
        model = model.strip()
        if "," in model:
            raise UsageError(f"--learning_rate {value!r} gives the rates of several models; repeat the flag, one "
                             f"model each, as in --learning_rate gpt=1e-3 --learning_rate bigram=1e-2")
        if equals and not model:
            raise UsageError(f"--learning_rate {value!r} names no model before =; give MODEL=RATE,... for one "
                             f"model, or the rates alone for every model")
        if model and model not in names:
            raise UsageError(f"--learning_rate {value}: {model} is not in --models; name one of {', '.join(names)}")
        if model in own or (not model and shared != [None]):
            raise UsageError(f"--learning_rate gives {'the rates of ' + model if model else 'a list for every model'} "
                             f"twice; give each once")
        parsed = rate_list(rates, value)
        if model:
            own[model] = parsed
        else:
            shared = parsed
    return {name: own.get(name, shared) for name in names}


def rate_list(rates, value):
    """The positive finite learning rates of a comma-separated list, each once, in increasing order."""
    parsed = []
    for item in list_items(value, "--learning_rate", "5e-4,1e-3,2e-3", rates.split(",")):
        try:
            rate = float(item)
        except ValueError:
            rate = None
        if rate is None or not 0 < rate < math.inf:
            raise UsageError(f"--learning_rate {value}: {item!r} is not a positive number; give rates as "
                             f"in 5e-4,1e-3,2e-3, or MODEL=5e-4,1e-3 for one model")
        parsed.append(rate)
    # rates that print alike would share a run directory (gpt_lr0.001_s1337): refused as one rate given twice
    refuse_twice([f"{rate:g}" for rate in parsed], f"--learning_rate {value!r}", lambda rate: f"the rate {rate}")
    return sorted(parsed)


def baseline_name(requested, names):
    """The configuration that others are compared with: --baseline (checked), else gpt where it is planned."""
    if requested is None:
        return "gpt" if "gpt" in names else None
    if requested not in names:
        raise UsageError(f"--baseline {requested!r} is not in this comparison; choose one of "
                         f"{', '.join(dict.fromkeys(names))}")
    return requested


def first_seeds(runs):
    """The run of each configuration with its first seed (in the order of --seed), whose sample stands for it."""
    first = {}
    for r in runs:
        first.setdefault(r.config_name, r)
    return list(first.values())


def model_names(models):
    """The model names of --models, all-layers expanded, and the layer_support records when it was asked for."""
    requested = list_items(models, "--models", DEFAULT_MODELS)
    refuse_twice(requested, f"--models {models!r}")
    records = guard.layer_support() if ALL_LAYERS in requested else None
    names = []
    for m in requested:
        names += [r.name for r in records if r.works] if m == ALL_LAYERS else [m]
    for name in names:
        if script_for(name).graph_layer:
            guard.check_layer_name(name, f"model {name!r} in --models", other_models=("bigram", "gpt", ALL_LAYERS))
    return list(dict.fromkeys(names)), records


def placements(name, pairs):
    """The (graph, positions) pairs a model trains with: those of --graphs and --pos, or none for the bigram,
    which has neither."""
    if not script_for(name).has_model_size:
        return [(None, None)]
    return pairs


def pass_through_flags(extra):
    """For each training script, the extra training flags (with their values) that its parser accepts."""
    groups = []
    for token in extra:
        if token.startswith("--"):
            groups.append([token])
        elif groups:
            groups[-1].append(token)
        else:
            raise UsageError(f"unexpected argument {token!r}; see python compare.py --help")
    parsers = {script: cli.build_parser(script) for script in SCRIPTS}
    flags = {script: {f for action in parser._actions for f in action.option_strings} for script, parser in
             parsers.items()}
    known = set().union(*flags.values())
    passed = {script: [] for script in SCRIPTS}
    for group in groups:
        flag = group[0].split("=")[0]
        # the training scripts' argparse would take an abbreviation for the flag it begins
        meant = [] if flag in known or flag == "--" else sorted(f for f in known if f.startswith(flag))
        if flag in NOT_PASSED or meant and set(meant) <= set(NOT_PASSED):
            raise UsageError(f"{' or '.join(meant) or flag} is not passed through compare.py, which picks each run's "
                             f"layer, directory and W&B run name and resumes unfinished runs itself; see python "
                             f"compare.py --help")
        meant = [f for f in meant if f not in NOT_PASSED]
        if flag not in known:
            named = ", ".join(meant[:-1]) + " or " + meant[-1] if len(meant) > 1 else "".join(meant)
            raise UsageError(f"{flag} abbreviates {named}; write training flags in full" if meant else
                             f"unknown flag {flag}; see python compare.py --help and python pyg-gpt.py --help")
        having = [script for script in SCRIPTS if flag in flags[script]]
        accepting = [script for script in having if not parsers[script].parse_known_args(group)[1]]
        if not accepting:
            stray = parsers[having[0]].parse_known_args(group)[1][0]
            raise UsageError(f"unexpected argument {stray!r} after {flag}; see python compare.py --help")
        for script in accepting:
            passed[script] += group
    return passed


def comparison_text(data, report_only):
    """The text of --data, the default file downloaded first where it is missing, read once for the whole
    comparison; with report_only, which reads finished runs alone, None where the text is not there."""
    path = Path(data or DEFAULT_DATA)
    return None if report_only and not path.is_file() else load_text(data)


def plan_run(model, graph, pos, seed, args, extra, digest, rate=None):
    """The training run of one model on one graph with one kind of positions (None for the bigram), one learning
    rate (None: the preset's, and a run name without it) and one seed, its arguments checked as the training
    script would check them; digest: the data_sha256 of the comparison's text (None where it has none), which a
    run of another text does not match."""
    script = script_for(model)
    argv = [*(["--gat_version", model] if script.graph_layer else []),
            *(["--graph", graph, "--pos", pos] if script.has_model_size else []),
            "--preset", args.preset, "--device", args.device, "--seed", str(seed),
            *(["--max_iters", str(args.max_iters)] if args.max_iters is not None else []),
            *(["--learning_rate", repr(rate)] if rate is not None else []),
            *(["--data", args.data] if args.data else []), *extra]
    training_args = cli.build_parser(script).parse_args(argv)
    # a SLURM job's device is that of its node, where its training checks it; a report reads runs made elsewhere
    named = args.launcher == "slurm" or (args.report_only and args.device != "auto")
    device = torch.device(args.device) if named else cli.resolve_device(training_args.device)
    preset, settings = cli.resolve_settings(script, training_args, device, "--graphs")
    name = run_name(model, settings)
    with_rate = "" if args.learning_rate is None else f"_lr{settings['learning_rate']:g}"
    out_dir = Path(args.runs) / f"{name}{with_rate}_s{seed}"
    expected = {"name": name, "settings": settings, "seed": seed, "preset": preset, "device": str(device),
                "data": str(args.data or DEFAULT_DATA), **({"data_sha256": digest} if digest else {})}
    if script.graph_layer:
        expected["model_config"] = {"mixer": model, "backend": training_args.backend,
                                    "mixer_kwargs": parse_layer_kwargs(training_args.gnn_kwargs)}
        if not args.report_only:  # refused here, before any model trains, as its training would refuse it
            check_layer(model, training_args.backend, training_args.gnn_kwargs, json.dumps(settings, sort_keys=True))
    return Run(out_dir.name, name, seed, script, [*argv, "--out_dir", str(out_dir)], out_dir, expected)


@functools.cache
def check_layer(model, backend, gnn_kwargs, settings):
    """The causality guard on a graph layer with its --gnn_kwargs and the settings (as JSON) of its runs, once for
    all of their seeds. It builds and probes one layer, which reads no vocabulary: the default size stands in for
    the data's."""
    cli.layer_config(model, backend, parse_layer_kwargs(gnn_kwargs), json.loads(settings), GPTConfig.vocab_size)
