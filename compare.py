"""Train several models under one budget, or reuse their finished runs, then plot and tabulate the results.

    python compare.py                                   # bigram, gpt, GATConv and GATv2Conv
    python compare.py --models all-layers --max_iters 500   # the layer leaderboard
    python compare.py --jobs 4                          # the four at once, each in a process of its own
    python compare.py --models gpt,GATv2Conv --graphs full,window:16,dilated:8:4 --pos abs,rel   # a graph study
"""
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gnngpt import cli, guard
from gnngpt.config import PUBLISHED_STEP, SCRIPTS, SEED, Script, script_for
from gnngpt.data import DEFAULT_DATA, load_text
from gnngpt.errors import UsageError, exit_code, one_line
from gnngpt.files import atomic_write_text
from gnngpt.jobs import Job, run_jobs
from gnngpt.mixers import parse_layer_kwargs
from gnngpt.plots import plot_graph_study, plot_leaderboard, plot_val_loss
from gnngpt.results import (
    graph_study_table,
    leaderboard_table,
    load_run_model,
    published_val_loss,
    results_table,
    run_summary,
    setting_notes,
)
from gnngpt.rundir import (
    file_in_the_way,
    holds_run,
    is_default_runs_dir,
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
                        "list goes in brackets, as in full,window:16,[window:4,window:16] (default: full)")
    p.add_argument("--pos", default="abs", metavar="abs,rel",
                   help="comma-separated positions (abs, rel), each model trained with each (default: abs)")
    p.add_argument("--preset", choices=("auto", "paper", "cpu"), default="auto",
                   help="hyperparameters of every run, as in the training scripts (default: auto)")
    p.add_argument("--max_iters", type=int, help="training steps of every run (default: from --preset)")
    p.add_argument("--device", choices=cli.DEVICES, default="auto",
                   help=f"where to train; {cli.AUTO_DEVICE_HELP} (default: auto)")
    p.add_argument("--data", metavar="PATH", help=f"UTF-8 training text (default: {DEFAULT_DATA})")
    p.add_argument("--seed", type=int, default=SEED, help=f"random seed of every run (default: {SEED})")
    p.add_argument("--runs", default="runs", metavar="DIR",
                   help="each run goes to DIR/<run name>, with its sample in model_outputs/<run name>.txt when DIR "
                        "is runs, else in DIR/<run name>/sample.txt (default: runs)")
    p.add_argument("--out", metavar="DIR",
                   help="where val_loss.png, results.md and the leaderboard go (default: plots when --runs is "
                        "runs, else the --runs DIR, so that a comparison elsewhere leaves the committed plots alone)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace runs in --runs whose settings differ (default: refuse them and train nothing)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train up to N models at once, each in a process of its own with its output in "
                        "<run dir>/train.log and one status line here; with several visible GPUs each gets one "
                        "(default: 1: one after the other, in this process)")
    return p


@dataclass
class Run:
    """One model's training run: its script, its arguments, and the config a reusable run must have."""
    name: str
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
    out = Path(args.out or ("plots" if is_default_runs_dir(args.runs) else args.runs))
    for flag, directory in (("--runs", args.runs), ("--out", out)):
        if refusal := file_in_the_way(directory, flag):
            raise UsageError(refusal)
    names, layer_records = model_names(args.models)
    graphs, positions = cli.graph_list(args.graphs), cli.position_list(args.pos)
    passed = pass_through_flags(extra)
    runs = [plan_run(name, graph, pos, args, passed[script_for(name)])  # checks everything before training
            for name in names for graph, pos in placements(name, graphs, positions)]
    runs = list({r.name: r for r in runs}.values())
    states = {r.name: r.state() for r in runs}
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
    if args.jobs == 1:
        stopped, failed = train_here(pending, states)
    else:
        stopped, failed = train_in_processes(pending, states, args.jobs)
    if stopped:  # by SIGINT or SIGTERM
        print("compare.py stopped; run the same command again to go on: finished runs are reused and "
              "stopped ones resume", file=sys.stderr)
        return stopped
    done = [r for r in runs if r.name not in failed]
    for r in done:
        write_missing_sample(r, args.seed)

    summaries = [run_summary(r.out_dir) for r in done]
    if summaries and layer_records is not None:  # the leaderboard instead, so that the comparison's plot stays
        write_leaderboard(summaries, layer_records, failed, out, argv)
    elif summaries and len(graphs) * len(positions) > 1:  # a graph study, likewise
        write_graph_study(summaries, out, argv)
    elif summaries:
        write_comparison(summaries, out, argv, args.jobs)
    if failed:
        print(f"error: training failed for {', '.join(failed)} (see the errors above); run compare.py again to "
              f"retry them: finished runs are reused", file=sys.stderr)
        return 1
    return 0


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


def train_in_processes(runs, states, at_once):
    """Train the runs by their training scripts in child processes, at_once at a time (see jobs.run_jobs).

    Returns the exit code of a stop by SIGINT or SIGTERM (0 when none) and the exit code of each failed run.
    """
    jobs = [Job(r.name, [sys.executable, str(ROOT / r.script.filename), *training_argv(r, states[r.name])],
                r.out_dir, r.expected["settings"]["max_iters"], resume=states[r.name] == "resume",
                device=r.expected["device"])
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


def placements(name, graphs, positions):
    """The (graph, positions) pairs a model trains with: each of them, or none for the bigram, which has neither."""
    if not script_for(name).has_model_size:
        return [(None, None)]
    return [(graph, pos) for graph in graphs for pos in positions]


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


def plan_run(model, graph, pos, args, extra):
    """The training run of one model on one graph with one kind of positions (None for the bigram), its arguments
    checked as the training script would check them."""
    script = script_for(model)
    argv = [*(["--gat_version", model] if script.graph_layer else []),
            *(["--graph", graph, "--pos", pos] if script.has_model_size else []),
            "--preset", args.preset, "--device", args.device, "--seed", str(args.seed),
            *(["--max_iters", str(args.max_iters)] if args.max_iters is not None else []),
            *(["--data", args.data] if args.data else []), *extra]
    training_args = cli.build_parser(script).parse_args(argv)
    set_by_compare = (training_args.out_dir, getattr(training_args, "gat_version", model), training_args.resume,
                      training_args.wandb_run_name)
    if set_by_compare != (None, model, False, None):
        raise UsageError("a training flag abbreviates --out_dir, --gat_version, --resume or --wandb_run_name, which "
                         "compare.py sets itself; write training flags in full")
    device = cli.resolve_device(training_args.device)
    preset, settings = cli.resolve_settings(script, training_args, device)
    name = run_name(model, settings)
    out_dir = Path(args.runs) / name
    expected = {"name": name, "settings": settings, "seed": args.seed, "preset": preset, "device": str(device),
                "data": str(args.data or DEFAULT_DATA)}
    if script.graph_layer:
        expected["model_config"] = {"mixer": model, "backend": training_args.backend,
                                    "mixer_kwargs": parse_layer_kwargs(training_args.gnn_kwargs)}
    return Run(name, script, [*argv, "--out_dir", str(out_dir)], out_dir, expected)


def write_missing_sample(run, seed):
    """Write the run's sample (see sampling.sample_path) from its checkpoint when a reused run has none."""
    path = sample_path(run.out_dir, run.name)
    if path.exists():
        return
    device = torch.device(run.expected["device"])
    model, tokenizer, _ = load_run_model(run.out_dir, device)
    torch.manual_seed(seed)
    write_model_output(model, tokenizer, path, device)
    print(f"wrote {path}")


def describe(summaries):
    """The presets and machines of the runs, for titles."""
    presets = ", ".join(dict.fromkeys(s["preset"] for s in summaries))
    machines = "; ".join(dict.fromkeys(s["machine"] for s in summaries))
    return f"preset {presets}, {machines}"


def command(argv):
    return shlex.join(["python", "compare.py", *argv])


def write_comparison(summaries, out, argv, jobs):
    """val_loss.png and results.md: the table, with the published values and any setting that is not the preset's."""
    published = {s["name"]: published_val_loss(s) for s in summaries if published_val_loss(s) is not None}
    plot_val_loss(summaries, out / "val_loss.png", f"Validation loss ({describe(summaries)})", published,
                  PUBLISHED_STEP)
    notes = ""
    if published:
        notes += (f"published: the original's validation loss after {PUBLISHED_STEP} steps of the paper preset on "
                  f"an A100, read from its plot.\n\n")
    differences = setting_notes(summaries)
    if differences:
        notes += "Settings that differ from the preset:\n\n" + "".join(f"{line}\n" for line in differences) + "\n"
    if jobs > 1:
        notes += (f"Up to {jobs} runs trained at once (--jobs {jobs}): the tokens/s and wall times of those trained "
                  f"by this command were measured while they shared the machine.\n\n")
    samples = ", ".join(f"`{sample_path(s['out_dir'], s['name']).as_posix()}`" for s in summaries)
    text = (f"# Results\n\nMade by `{command(argv)}` ({describe(summaries)}).\n\n{results_table(summaries)}\n"
            f"{notes}Samples: {samples}.\n")
    atomic_write_text(out / "results.md", text)
    print(f"wrote {out / 'val_loss.png'} and {out / 'results.md'}")


def write_leaderboard(summaries, records, failed, out, argv):
    """The leaderboard table and figure, and the layers that could not take part with their reasons."""
    plot_leaderboard(summaries, out / "leaderboard.png", f"Token-mixer leaderboard ({describe(summaries)})")
    left_out = [(r.name, r.reason) for r in records if not r.works]
    left_out += [(name, f"training failed (exit code {code})") for name, code in failed.items()]
    text = (f"# Layer leaderboard\n\nMade by `{command(argv)}` ({describe(summaries)}).\n\n"
            f"{leaderboard_table(summaries)}")
    if left_out:
        text += "\nNot ranked:\n\n" + "".join(f"- {name}: {reason}\n" for name, reason in left_out)
    atomic_write_text(out / "leaderboard.md", text)
    print(f"wrote {out / 'leaderboard.png'} and {out / 'leaderboard.md'}")


def write_graph_study(summaries, out, argv):
    """Validation loss against edges per token and against training speed, one point per model, graph and
    positions, with the table behind it."""
    plot_graph_study(summaries, out / "graphs.png", f"Context graphs ({describe(summaries)})")
    text = (f"# Context graphs\n\nMade by `{command(argv)}` ({describe(summaries)}).\n\n"
            f"{graph_study_table(summaries)}")
    atomic_write_text(out / "graphs.md", text)
    print(f"wrote {out / 'graphs.png'} and {out / 'graphs.md'}")


if __name__ == "__main__":
    sys.exit(main())
