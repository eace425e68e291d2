"""Train several models under one budget, or reuse their finished runs, then plot and tabulate the results.

    python compare.py                                   # bigram, gpt, GATConv and GATv2Conv
    python compare.py --models all-layers --max_iters 500   # the layer leaderboard
    python compare.py --jobs 4                          # the four at once, each in a process of its own
    python compare.py --models gpt,GATv2Conv --graphs full,window:16,dilated:8:4 --pos abs,rel   # a graph study
    python compare.py --seeds 3                         # each configuration with seeds 1337, 1338 and 1339
    python compare.py --seeds 3 --report_only           # the tables and figures again, from the run files alone
    python compare.py --launcher slurm --slurm_gpus 1 --slurm_time 4:00:00   # each run a SLURM job (docs/slurm.md)
"""
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gnngpt import cli, guard, slurm
from gnngpt.config import PUBLISHED_STEP, SCRIPTS, SEED, Script, script_for
from gnngpt.data import DEFAULT_DATA, load_text
from gnngpt.errors import UsageError, exit_code, one_line
from gnngpt.evaluation import (
    describe as describe_exact_loss,
    read_eval,
    run_validation_split,
    timed_exact_loss,
    write_eval,
)
from gnngpt.files import atomic_write_text
from gnngpt.jobs import Job, run_jobs
from gnngpt.mixers import parse_layer_kwargs
from gnngpt.plots import plot_graph_study, plot_leaderboard, plot_val_loss
from gnngpt.results import (
    configurations,
    graph_comparisons,
    graph_study_table,
    leaderboard_table,
    load_run_model,
    published_val_loss,
    results_table,
    run_summary,
    seconds_to_target,
    setting_notes,
    target_table,
    uncertainty_notes,
)
from gnngpt.rundir import (
    file_in_the_way,
    holds_run,
    is_finished,
    read_config,
    refuse_if_held,
    run_name,
)
from gnngpt.sampling import sample_path, write_model_output

DEFAULT_MODELS = "bigram,gpt,GATConv,GATv2Conv"
ALL_LAYERS = "all-layers"
# compare.py decides these itself; each run's W&B run is named after the run
NOT_PASSED = ("--out_dir", "--gat_version", "--gnn", "--resume", "--list_layers", "--wandb_run_name")
ROOT = Path(__file__).resolve().parent  # where the training scripts are


def build_parser():
    p = cli.ArgumentParser(
        allow_abbrev=False,  # an abbreviated flag would differ from the one a rebuilt report's command line keeps
        description="Train models under one budget (or reuse their finished runs) and write a validation-loss "
                    "plot, a results table and samples.",
        epilog="Any other training flag (such as --batch_size 8, --n_embd 64, --wandb_log or --tensorboard) is "
               "passed to every training script that has it; each model's run is tracked apart.",
    )
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma-separated: bigram, gpt, a PyG layer name such as GATConv, or {ALL_LAYERS} "
                        f"(every layer that works as a token mixer, ranked in a leaderboard) "
                        f"(default: {DEFAULT_MODELS})")
    p.add_argument("--graphs", default="full", metavar="SPEC,...",
                   help="comma-separated context graphs, each model (but the bigram) trained on each; a per-layer "
                        "list goes in brackets, as in full,window:16,[window:4,window:16]; a graph with @abs or @rel "
                        "after it trains with those positions only, whatever --pos says (default: full)")
    p.add_argument("--pos", default="abs", metavar="abs,rel",
                   help="comma-separated positions (abs, rel), each model trained with each on every graph that "
                        "names none after an @ (default: abs)")
    p.add_argument("--preset", choices=("auto", "paper", "cpu"), default="auto",
                   help="hyperparameters of every run, as in the training scripts (default: auto)")
    p.add_argument("--max_iters", type=int, help="training steps of every run (default: from --preset)")
    p.add_argument("--device", choices=cli.DEVICES, default="auto",
                   help=f"where to train; {cli.AUTO_DEVICE_HELP} (default: auto)")
    p.add_argument("--data", metavar="PATH", help=f"UTF-8 training text (default: {DEFAULT_DATA})")
    p.add_argument("--seed", default=str(SEED), metavar="SEED[,SEED...]",
                   help=f"the first seed of every configuration, or a comma-separated list of seeds (default: {SEED})")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train every configuration with N seeds: --seed, --seed + 1, ..., each in a run directory of "
                        "its own (default: 1)")
    p.add_argument("--baseline", metavar="NAME",
                   help="the configuration others are compared with, paired by seed (default: gpt when it is in the "
                        "comparison)")
    p.add_argument("--target_loss", type=float, metavar="X",
                   help="also tabulate the steps, tokens and training seconds at which each configuration first "
                        "reached validation loss X")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: rebuild the tables and figures from the finished runs' small files "
                        "(config.json, metrics.csv, eval.json); no checkpoint is needed")
    p.add_argument("--runs", default="runs", metavar="DIR",
                   help="each run goes to DIR/<run name>, with its sample in DIR/<run name>/sample.txt "
                        "(default: runs)")
    p.add_argument("--out", metavar="DIR",
                   help="where val_loss.png, results.md and the leaderboard go (default: the --runs DIR; --out plots "
                        "writes the figures and samples this repository ships)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace runs in --runs whose settings differ (default: refuse them and train nothing)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train up to N models at once, each in a process of its own with its output in "
                        "<run dir>/train.log and one status line here; with several visible GPUs each gets one "
                        "(default: 1: one after the other, in this process)")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="where the runs train: local, on this machine (with --jobs), or slurm, each unfinished run a "
                        "SLURM job submitted through submitit, with its files in the slurm folder of --runs (see "
                        "docs/slurm.md) (default: local)")
    p.add_argument("--slurm_partition", metavar="NAME", help="the partition of the jobs (default: the cluster's)")
    p.add_argument("--slurm_time", metavar="TIME",
                   help="the time limit of each job: minutes, H:MM:SS or D-HH:MM (default: the partition's)")
    p.add_argument("--slurm_gpus", type=int, metavar="N",
                   help="GPUs of each job; with N > 0, --device auto is cuda (default: 0, and cpu)")
    p.add_argument("--slurm_cpus", type=int, metavar="N",
                   help="CPU cores of each job, and the torch threads of its training (default: the cluster's)")
    p.add_argument("--slurm_args", metavar="KEY=VALUE,...",
                   help="further sbatch options of every job, as in account=abc,constraint=a100")
    return p


@dataclass
class Run:
    """One training run of a configuration (a model on a graph with positions) and a seed: its script, its
    arguments, and the config a reusable run must have. Its name is its directory's: the configuration's
    name and the seed, as in gpt_s1337."""
    name: str
    config_name: str
    seed: int
    script: Script
    argv: list
    out_dir: Path
    expected: dict

    def state(self):
        """"reuse" a finished run with these settings, "resume" an unfinished one, start a "new" one or "replace".

        A run that a training holds is refused."""
        refuse_if_held(self.out_dir, "wait for it to end or pass --runs DIR to compare elsewhere")
        if not holds_run(self.out_dir):
            return "new"
        config = read_config(self.out_dir)
        same = config is not None and has_values(config, self.expected)
        if same and is_finished(self.out_dir, config):
            return "reuse"
        if same and (self.out_dir / "ckpt.pt").is_file():
            return "resume"
        return "replace"


def has_values(config, expected):
    """Whether config holds each value of expected; nested dicts are compared key by key."""
    return all(
        has_values(config.get(key, {}), value) if isinstance(value, dict) else config.get(key) == value
        for key, value in expected.items()
    )


def main(argv=None):
    """Compare the models; exit code 2 with a one-line error for bad input, 1 when a training failed."""
    argv = sys.argv[1:] if argv is None else argv
    args, extra = build_parser().parse_known_args(argv)
    return exit_code(run, args, extra, argv)


def run(args, extra, argv):
    if args.jobs < 1:
        raise UsageError(f"--jobs must be a positive integer, got {args.jobs}")
    launcher = slurm.options(args)  # None for --launcher local
    if launcher:
        args.device = launcher.device  # that of each job, checked by its training on its node
    out = Path(args.out or args.runs)
    for flag, directory in (("--runs", args.runs), ("--out", out)):
        if refusal := file_in_the_way(directory, flag):
            raise UsageError(refusal)
    names, layer_records = model_names(args.models)
    pairs = cli.placement_list(args.graphs, args.pos)
    seeds = seed_list(args.seed, args.seeds)
    passed = pass_through_flags(extra)
    runs = [plan_run(name, graph, pos, seed, args, passed[script_for(name)])  # checks everything before training
            for name in names for graph, pos in placements(name, pairs) for seed in seeds]
    runs = list({r.name: r for r in runs}.values())
    baseline = baseline_name(args.baseline, [r.config_name for r in runs])
    waiting = slurm.waiting_runs(runs, launcher) if launcher else set()  # their jobs are still going
    states = {r.name: "submitted" if r.name in waiting else r.state() for r in runs}
    if args.report_only:
        return report(runs, states, args, out, argv, baseline, layer_records, pairs)
    taken = [str(r.out_dir) for r in runs if states[r.name] == "replace"]
    if taken and not args.overwrite:
        raise UsageError(f"{', '.join(taken)} already hold runs that do not match these settings; pass --overwrite "
                         f"to replace them or --runs DIR to train elsewhere")

    for r in runs:
        if states[r.name] == "reuse":
            print(f"{r.name}: reusing the finished run in {r.out_dir}")
    pending = [r for r in runs if states[r.name] != "reuse"]
    if pending:
        load_text(args.data)  # checked (and downloaded when missing) once, before any training reads it
    if launcher:
        stopped, failed = slurm.train_as_jobs(pending, states, training_command, launcher)
    elif args.jobs == 1:
        stopped, failed = train_here(pending, states)
    else:
        stopped, failed = train_in_processes(pending, states, args.jobs)
    if stopped:  # by SIGINT or SIGTERM
        print("compare.py stopped; run the same command again to go on: finished runs are reused and "
              "stopped ones resume", file=sys.stderr)
        return stopped
    done = [r for r in runs if r.name not in failed]
    for r in done:
        write_missing_exact_loss(r)
    write_model_samples(done, out, shipped=layer_records is None and len(pairs) == 1)
    write_report(done, args, out, argv, baseline, layer_records, pairs, failed)
    if failed:
        print(f"error: training failed for {', '.join(failed)} (see the errors above); run compare.py again to "
              f"retry them: finished runs are reused", file=sys.stderr)
        return 1
    return 0


def seed_list(seed, count):
    """The seeds of --seed (one, or a comma-separated list) and --seeds N (N seeds from one --seed)."""
    try:
        seeds = [int(s) for s in seed.split(",")]
    except ValueError:
        raise UsageError(f"--seed {seed!r} is not an integer or a comma-separated list of integers") from None
    if count < 1:
        raise UsageError(f"--seeds must be a positive integer, got {count}")
    if len(seeds) > 1 and count != 1:
        raise UsageError(f"--seeds {count} and a list in --seed {seed} exclude each other; give one of them")
    if len(set(seeds)) < len(seeds):
        raise UsageError(f"--seed {seed} names a seed twice; give each seed once")
    return seeds if len(seeds) > 1 else [seeds[0] + i for i in range(count)]


def baseline_name(requested, names):
    """The configuration that others are compared with: --baseline (checked), else gpt where it is planned."""
    if requested is None:
        return "gpt" if "gpt" in names else None
    if requested not in names:
        raise UsageError(f"--baseline {requested} is not in this comparison; choose one of "
                         f"{', '.join(dict.fromkeys(names))}")
    return requested


def first_seeds(runs):
    """The run of each configuration with its first seed (in the order of --seed), whose sample stands for it."""
    first = {}
    for r in runs:
        first.setdefault(r.config_name, r)
    return list(first.values())


def training_argv(run, state):
    """The training script's arguments for a run in state "new", "resume" or "replace"."""
    return run.argv + {"resume": ["--resume"], "replace": ["--overwrite"]}.get(state, [])


def train_here(runs, states):
    """Train the runs in this process, one after the other.

    Returns the exit code of a stop by SIGINT or SIGTERM (0 when none) and the exit code of each failed run.
    """
    failed = {}
    for r in runs:
        print(f"{r.name}: {'resuming' if states[r.name] == 'resume' else 'training'} in {r.out_dir}")
        try:
            code = cli.main(r.script, training_argv(r, states[r.name]))
        except Exception as e:  # noqa: BLE001 - a layer failing at this size must not stop the other models
            print(f"error: {r.name} failed: {one_line(e)}", file=sys.stderr)
            code = 1
        if code > 128:  # stopped by SIGINT or SIGTERM: stop comparing too
            return code, failed
        if code:
            failed[r.name] = code
    return 0, failed


def training_command(run, state):
    """The command line that trains a run by its training script in a process of its own."""
    return [sys.executable, str(ROOT / run.script.filename), *training_argv(run, state)]


def train_in_processes(runs, states, at_once):
    """Train the runs by their training scripts in child processes, at_once at a time (see jobs.run_jobs).

    Returns the exit code of a stop by SIGINT or SIGTERM (0 when none) and the exit code of each failed run.
    """
    jobs = [Job(r.name, training_command(r, states[r.name]), r.out_dir, r.expected["settings"]["max_iters"],
                resume=states[r.name] == "resume", device=r.expected["device"])
            for r in runs]
    stopped = run_jobs(jobs, at_once)
    return stopped, {job.name: job.exit_code for job in jobs if job.state == "failed"}


def model_names(models):
    """The model names of --models, all-layers expanded, and the layer_support records when it was asked for."""
    requested = [m.strip() for m in models.split(",") if m.strip()]
    if not requested:
        raise UsageError(f"--models is empty; give a comma-separated list such as {DEFAULT_MODELS}")
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
    passed = {script: [] for script in SCRIPTS}
    for group in groups:
        flag = group[0].split("=")[0]
        if flag in NOT_PASSED:
            raise UsageError(f"{flag} is not passed through compare.py, which picks each run's layer, directory and "
                             f"W&B run name and resumes unfinished runs itself; see python compare.py --help")
        accepting = [script for script, parser in parsers.items() if not parser.parse_known_args(group)[1]]
        if not accepting:
            raise UsageError(f"unknown flag {flag}; see python compare.py --help and python pyg-gpt.py --help")
        for script in accepting:
            passed[script] += group
    return passed


def plan_run(model, graph, pos, seed, args, extra):
    """The training run of one model on one graph with one kind of positions (None for the bigram) and one seed,
    its arguments checked as the training script would check them."""
    script = script_for(model)
    argv = [*(["--gat_version", model] if script.graph_layer else []),
            *(["--graph", graph, "--pos", pos] if script.has_model_size else []),
            "--preset", args.preset, "--device", args.device, "--seed", str(seed),
            *(["--max_iters", str(args.max_iters)] if args.max_iters is not None else []),
            *(["--data", args.data] if args.data else []), *extra]
    training_args = cli.build_parser(script).parse_args(argv)
    set_by_compare = (training_args.out_dir, getattr(training_args, "gat_version", model), training_args.resume,
                      training_args.wandb_run_name)
    if set_by_compare != (None, model, False, None):
        raise UsageError("a training flag abbreviates --out_dir, --gat_version, --resume or --wandb_run_name, which "
                         "compare.py sets itself; write training flags in full")
    if script.graph_layer:
        guard.check_layer_name(model)
    # a SLURM job's device is that of its node, where its training checks it; a report reads runs made elsewhere
    named = args.launcher == "slurm" or (args.report_only and args.device != "auto")
    device = torch.device(args.device) if named else cli.resolve_device(training_args.device)
    preset, settings = cli.resolve_settings(script, training_args, device)
    name = run_name(model, settings)
    out_dir = Path(args.runs) / f"{name}_s{seed}"
    expected = {"name": name, "settings": settings, "seed": seed, "preset": preset, "device": str(device),
                "data": str(args.data or DEFAULT_DATA)}
    if script.graph_layer:
        expected["model_config"] = {"mixer": model, "backend": training_args.backend,
                                    "mixer_kwargs": parse_layer_kwargs(training_args.gnn_kwargs)}
    return Run(out_dir.name, name, seed, script, [*argv, "--out_dir", str(out_dir)], out_dir, expected)


def write_missing_exact_loss(run):
    """Write the run's eval.json from its checkpoint when it has none of its last step (runs from before every
    training ended with it)."""
    config = read_config(run.out_dir)
    if read_eval(run.out_dir, config["settings"]["max_iters"]) is not None:
        return
    device = reading_device(run)
    model, tokenizer, _ = load_run_model(run.out_dir, device)
    result = timed_exact_loss(model, run_validation_split(config, tokenizer.chars), config["settings"], device)
    write_eval(run.out_dir, result, config["settings"]["max_iters"])
    print(f"{run.name}: {describe_exact_loss(result)} (computed from its checkpoint)")


def model_samples_dir(out, shipped=True):
    """Where a comparison keeps one sample per model: model_outputs/, the shipped samples, for the comparison of
    models (shipped) whose figures go to plots/paper/, the published comparison's; else the model_outputs folder
    of its --out."""
    return Path("model_outputs") if shipped and Path(out).resolve() == Path("plots/paper").resolve() else \
        Path(out) / "model_outputs"


def write_model_samples(runs, out, shipped):
    """Each model's sample, its first seed's, in model_samples_dir(out, shipped)/<model>.txt; a run without a
    sample of its own (see sampling.sample_path) gets one from its checkpoint first."""
    for run in first_seeds(runs):
        source = sample_path(run.out_dir)
        if not source.exists():
            write_missing_sample(run, source)
        atomic_write_text(model_samples_dir(out, shipped) / f"{run.config_name}.txt",
                          source.read_text(encoding="utf-8"))


def reading_device(run):
    """The device a reused run's checkpoint is read on: the run's own, or the CPU where this machine lacks it (as
    a login node lacks the GPU of a SLURM job)."""
    try:
        return cli.resolve_device(torch.device(run.expected["device"]).type)
    except UsageError:
        return torch.device("cpu")


def write_missing_sample(run, path):
    """Write the run's sample to path from its checkpoint."""
    device = reading_device(run)
    model, tokenizer, _ = load_run_model(run.out_dir, device)
    torch.manual_seed(run.seed)
    write_model_output(model, tokenizer, path, device)
    print(f"wrote {path}")


def report(runs, states, args, out, argv, baseline, layer_records, pairs):
    """--report_only: the tables and figures of finished runs, from their small files; refused while any run
    is unfinished or lacks its exact validation loss."""
    why = {"new": "not there", "resume": "not finished", "replace": "other settings", "submitted": "not finished"}
    missing = [f"{r.out_dir} ({why.get(states[r.name], 'no eval.json')})" for r in runs
               if states[r.name] != "reuse" or read_eval(r.out_dir, r.expected["settings"]["max_iters"]) is None]
    if missing:
        raise UsageError(f"--report_only needs every run finished with its eval.json, and {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not; run the same command without --report_only")
    write_report(runs, args, out, argv, baseline, layer_records, pairs, {})
    return 0


def write_report(runs, args, out, argv, baseline, layer_records, pairs, failed):
    """The comparison's tables and figures, from the small files of its finished runs."""
    configs = configurations([run_summary(r.out_dir) for r in runs])
    if not configs:
        return
    argv = [a for a in argv if a != "--report_only"]  # a rebuilt report reads as the one the trainings wrote
    baseline = next((c for c in configs if c["name"] == baseline), None)
    seeds = {r.config_name: r.seed for r in first_seeds(runs)}
    if layer_records is not None:  # the leaderboard instead, so that the comparison's plot stays
        write_leaderboard(configs, layer_records, failed, out, argv)
    elif len(pairs) > 1:  # a graph study, likewise
        write_graph_study(configs, baseline, args.target_loss, out, argv)
    else:
        write_comparison(configs, baseline, args.target_loss, seeds, out, argv, args.jobs)


def describe(configs):
    """The presets and machines of the runs, for titles."""
    presets = ", ".join(dict.fromkeys(c["preset"] for c in configs))
    machines = "; ".join(dict.fromkeys(c["machine"] for c in configs))
    return f"preset {presets}, {machines}"


def command(argv):
    return shlex.join(["python", "compare.py", *argv])


def statistics_text(configs, baseline, target_loss):
    """What the loss columns mean and, with target_loss, the table of when each configuration reached it."""
    text = uncertainty_notes(configs, baseline) + "\n"
    if target_loss is not None:
        text += (f"Time to a validation loss of {target_loss} (the random-batch estimates of each evaluation, "
                 f"mean over seeds):\n\n{target_table(configs, target_loss)}\n")
    return text


def write_comparison(configs, baseline, target_loss, seeds, out, argv, jobs):
    """val_loss.png and results.md: the table, with the published values and any setting that is not the preset's."""
    published = {c["name"]: published_val_loss(c) for c in configs if published_val_loss(c) is not None}
    plot_val_loss(configs, out / "val_loss.png", f"Validation loss ({describe(configs)})", published,
                  PUBLISHED_STEP)
    notes = statistics_text(configs, baseline, target_loss)
    if published:
        notes += (f"published: the original's validation loss after {PUBLISHED_STEP} steps of the paper preset on "
                  f"an A100, read from its plot (random batches, one seed).\n\n")
    differences = setting_notes(configs)
    if differences:
        notes += "Settings that differ from the preset:\n\n" + "".join(f"{line}\n" for line in differences) + "\n"
    if jobs > 1:
        notes += (f"Up to {jobs} runs trained at once (--jobs {jobs}): the tokens/s and wall times of those trained "
                  f"by this command were measured while they shared the machine.\n\n")
    samples = ", ".join(f"`{(model_samples_dir(out) / (c['name'] + '.txt')).as_posix()}` (seed {seeds[c['name']]})"
                        for c in configs)
    text = (f"# Results\n\nMade by `{command(argv)}` ({describe(configs)}).\n\n"
            f"{results_table(configs, baseline)}\n{notes}Samples: {samples}.\n")
    atomic_write_text(out / "results.md", text)
    print(f"wrote {out / 'val_loss.png'} and {out / 'results.md'}")


def write_leaderboard(configs, records, failed, out, argv):
    """The leaderboard table and figure, and the layers that could not take part with their reasons."""
    plot_leaderboard(configs, out / "leaderboard.png", f"Token-mixer leaderboard ({describe(configs)})")
    left_out = [(r.name, r.reason) for r in records if not r.works]
    left_out += [(name, f"training failed (exit code {code})") for name, code in failed.items()]
    text = (f"# Layer leaderboard\n\nMade by `{command(argv)}` ({describe(configs)}).\n\n"
            f"{leaderboard_table(configs)}\n{uncertainty_notes(configs, None)}")
    if left_out:
        text += "\nNot ranked:\n\n" + "".join(f"- {name}: {reason}\n" for name, reason in left_out)
    atomic_write_text(out / "leaderboard.md", text)
    print(f"wrote {out / 'leaderboard.png'} and {out / 'leaderboard.md'}")


def write_graph_study(configs, baseline, target_loss, out, argv):
    """Validation loss against edges per token and against training speed, one point per model, graph and
    positions, with the table behind it and the paired differences the study draws."""
    plot_graph_study(configs, out / "graphs.png", f"Context graphs ({describe(configs)})")
    text = (f"# Context graphs\n\nMade by `{command(argv)}` ({describe(configs)}).\n\n"
            f"{graph_study_table(configs, baseline)}\n{statistics_text(configs, baseline, target_loss)}")
    if comparisons := graph_comparisons(configs):
        text += f"Paired differences (configuration minus the one it is compared with, same seeds):\n\n{comparisons}"
    if target_loss is not None and (comparisons := graph_comparisons(
            configs, lambda c: seconds_to_target(c, target_loss), "Δ training seconds", 1)):
        text += (f"\nThe same pairs in training seconds to a validation loss of {target_loss} (seeds that reached "
                 f"it in both):\n\n{comparisons}")
    atomic_write_text(out / "graphs.md", text)
    print(f"wrote {out / 'graphs.png'} and {out / 'graphs.md'}")


if __name__ == "__main__":
    sys.exit(main())
