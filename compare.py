"""Train several models under one budget, or reuse their finished runs, then plot and tabulate the results.

    python compare.py                                   # bigram, gpt, GATConv and GATv2Conv
    python compare.py --models all-layers --max_iters 500   # the layer leaderboard
"""
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gnngpt import cli, guard
from gnngpt.config import SCRIPTS, SEED, Script, script_for
from gnngpt.data import DEFAULT_DATA
from gnngpt.errors import UsageError, exit_code, one_line
from gnngpt.files import atomic_write_text
from gnngpt.mixers import parse_layer_kwargs
from gnngpt.plots import plot_leaderboard, plot_val_loss
from gnngpt.results import leaderboard_table, load_run_model, results_table, run_summary
from gnngpt.rundir import holds_run, is_finished, read_config, refuse_if_held
from gnngpt.sampling import model_output_path, write_model_output

DEFAULT_MODELS = "bigram,gpt,GATConv,GATv2Conv"
ALL_LAYERS = "all-layers"
# compare.py decides these itself; each model's W&B run is named after the model
NOT_PASSED = ("--out_dir", "--gat_version", "--gnn", "--resume", "--list_layers", "--wandb_run_name")


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
    p.add_argument("--preset", choices=("auto", "paper", "cpu"), default="auto",
                   help="hyperparameters of every run, as in the training scripts (default: auto)")
    p.add_argument("--max_iters", type=int, help="training steps of every run (default: from --preset)")
    p.add_argument("--device", choices=cli.DEVICES, default="auto",
                   help=f"where to train; {cli.AUTO_DEVICE_HELP} (default: auto)")
    p.add_argument("--data", metavar="PATH", help=f"UTF-8 training text (default: {DEFAULT_DATA})")
    p.add_argument("--seed", type=int, default=SEED, help=f"random seed of every run (default: {SEED})")
    p.add_argument("--runs", default="runs", metavar="DIR", help="each run goes to DIR/<model> (default: runs)")
    p.add_argument("--out", default="plots", metavar="DIR",
                   help="where val_loss.png, results.md and the leaderboard go (default: plots)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace runs in --runs whose settings differ (default: refuse them and train nothing)")
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
    names, layer_records = model_names(args.models)
    passed = pass_through_flags(extra)
    runs = [plan_run(name, args, passed[script_for(name)]) for name in names]  # checks everything before training
    states = {r.name: r.state() for r in runs}
    taken = [str(r.out_dir) for r in runs if states[r.name] == "replace"]
    if taken and not args.overwrite:
        raise UsageError(f"{', '.join(taken)} already hold runs that do not match these settings; pass --overwrite "
                         f"to replace them or --runs DIR to train elsewhere")

    failed = {}
    for r in runs:
        state = states[r.name]
        if state == "reuse":
            print(f"{r.name}: reusing the finished run in {r.out_dir}")
            continue
        print(f"{r.name}: {'resuming' if state == 'resume' else 'training'} in {r.out_dir}")
        try:
            code = cli.main(r.script, r.argv + {"resume": ["--resume"], "replace": ["--overwrite"]}.get(state, []))
        except Exception as e:  # noqa: BLE001 - a layer failing at this size must not stop the other models
            print(f"error: {r.name} failed: {one_line(e)}", file=sys.stderr)
            code = 1
        if code > 128:  # stopped by SIGINT or SIGTERM: stop comparing too
            print("compare.py stopped; run the same command again to go on: finished runs are reused and the "
                  "stopped one resumes", file=sys.stderr)
            return code
        if code:
            failed[r.name] = code
    done = [r for r in runs if r.name not in failed]
    for r in done:
        write_missing_sample(r, args.seed)

    summaries = [run_summary(r.out_dir) for r in done]
    out = Path(args.out)
    if summaries and layer_records is None:
        write_comparison(summaries, out, argv)
    elif summaries:  # all-layers: the leaderboard instead, so that the comparison's plot and table stay
        write_leaderboard(summaries, layer_records, failed, out, argv)
    if failed:
        print(f"error: training failed for {', '.join(failed)} (see the errors above); run compare.py again to "
              f"retry them: finished runs are reused", file=sys.stderr)
        return 1
    return 0


def model_names(models):
    """The model names of --models, all-layers expanded, and the layer_support records when it was asked for."""
    requested = [m.strip() for m in models.split(",") if m.strip()]
    if not requested:
        raise UsageError(f"--models is empty; give a comma-separated list such as {DEFAULT_MODELS}")
    records = guard.layer_support() if ALL_LAYERS in requested else None
    names = []
    for m in requested:
        names += [r.name for r in records if r.works] if m == ALL_LAYERS else [m]
    return list(dict.fromkeys(names)), records


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


def plan_run(name, args, extra):
    """The training run of one model, its arguments checked as the training script would check them."""
    script = script_for(name)
    out_dir = Path(args.runs) / name
    argv = [*(["--gat_version", name] if script.graph_layer else []), "--out_dir", str(out_dir),
            "--preset", args.preset, "--device", args.device, "--seed", str(args.seed),
            *(["--max_iters", str(args.max_iters)] if args.max_iters is not None else []),
            *(["--data", args.data] if args.data else []), *extra]
    training_args = cli.build_parser(script).parse_args(argv)
    set_by_compare = (training_args.out_dir, getattr(training_args, "gat_version", name), training_args.resume,
                      training_args.wandb_run_name)
    if set_by_compare != (str(out_dir), name, False, None):
        raise UsageError("a training flag abbreviates --out_dir, --gat_version, --resume or --wandb_run_name, which "
                         "compare.py sets itself; write training flags in full")
    if script.graph_layer:
        guard.check_layer_name(name)
    device = cli.resolve_device(training_args.device)
    preset, settings = cli.resolve_settings(script, training_args, device)
    expected = {"name": name, "settings": settings, "seed": args.seed, "preset": preset, "device": str(device),
                "data": str(args.data or DEFAULT_DATA)}
    if script.graph_layer:
        expected["model_config"] = {"mixer": name, "backend": training_args.backend,
                                    "mixer_kwargs": parse_layer_kwargs(training_args.gnn_kwargs)}
    return Run(name, script, argv, out_dir, expected)


def write_missing_sample(run, seed):
    """Write model_outputs/<name>.txt from the run's checkpoint when a reused run has no sample there."""
    path = model_output_path(run.name)
    if path.exists():
        return
    device = torch.device(run.expected["device"])
    model, tokenizer, _ = load_run_model(run.out_dir, device)
    torch.manual_seed(seed)
    write_model_output(model, tokenizer, run.name, device)
    print(f"wrote {path}")


def describe(summaries):
    """The presets and machines of the runs, for titles."""
    presets = ", ".join(dict.fromkeys(s["preset"] for s in summaries))
    machines = "; ".join(dict.fromkeys(s["machine"] for s in summaries))
    return f"preset {presets}, {machines}"


def command(argv):
    return shlex.join(["python", "compare.py", *argv])


def write_comparison(summaries, out, argv):
    plot_val_loss(summaries, out / "val_loss.png", f"Validation loss ({describe(summaries)})")
    samples = ", ".join(f"`{model_output_path(s['name']).as_posix()}`" for s in summaries)
    text = (f"# Results\n\nMade by `{command(argv)}` ({describe(summaries)}).\n\n{results_table(summaries)}\n"
            f"Samples: {samples}.\n")
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


if __name__ == "__main__":
    sys.exit(main())
