"""Train several models under one budget, or reuse their finished runs, then plot and tabulate the results.

    python compare.py                                   # bigram, gpt, GATConv and GATv2Conv
    python compare.py --models all-layers --max_iters 500   # the layer leaderboard
    python compare.py --jobs 4                          # the four at once, each in a process of its own
    python compare.py --models gpt,GATv2Conv --graphs full,window:16,dilated:8:4 --pos abs,rel   # a graph study
    python compare.py --seeds 3                         # each configuration with seeds 1337, 1338 and 1339
    python compare.py --seeds 3 --report_only           # the tables, figures and samples again, from the run files
    python compare.py --seeds 3 --learning_rate 5e-4,1e-3,2e-3 --learning_rate bigram=3e-3,1e-2,3e-2
                                                        # each model at its own best rate, chosen on held-out text
    python compare.py --launcher slurm --slurm_gpus 1 --slurm_time 4:00:00   # each run a SLURM job (docs/slurm.md)
"""
import sys

from gnngpt.errors import exit_code, quiet_interrupt

with quiet_interrupt(__name__ == "__main__"):  # importing torch takes seconds: Ctrl-C then ends in one line
    from gnngpt import cli, study
    from gnngpt.config import SEED
    from gnngpt.data import DEFAULT_DATA
    from gnngpt.plan import ALL_LAYERS, DEFAULT_MODELS


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
                        "list, one graph per layer, goes in brackets, as in full,window:16,[window:4,window:4,"
                        "window:16,full] for four layers; a graph with @abs or @rel "
                        "after it trains with those positions only, whatever --pos says (default: full)")
    p.add_argument("--pos", default="abs", metavar="abs,rel",
                   help="comma-separated positions (abs, rel), each model trained with each on every graph that "
                        "names none after an @ (default: abs)")
    p.add_argument("--preset", choices=("auto", "paper", "cpu"), default="auto",
                   help="hyperparameters of every run, as in the training scripts (default: auto)")
    p.add_argument("--max_iters", type=int, help="training steps of every run (default: from --preset)")
    p.add_argument("--learning_rate", action="append", metavar="[MODEL=]RATE,...",
                   help="train every configuration at each of these learning rates, each in a run directory whose "
                        "name carries the rate, and report each at the rate with the lowest loss on the first half "
                        "of the validation split, measured on the second half; MODEL=RATE,... gives one model a grid "
                        "of its own; repeat the flag for several (default: the preset's rate, no tuning)")
    p.add_argument("--device", choices=cli.DEVICES, default="auto",
                   help=f"where to train; {cli.AUTO_DEVICE_HELP} (default: auto)")
    p.add_argument("--data", metavar="PATH", type=cli.path_value, help=f"UTF-8 training text (default: {DEFAULT_DATA})")
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
                   help="train nothing: rebuild the tables, figures and samples from the finished runs' small "
                        "files (config.json, metrics.csv, eval.json, loss_by_position.csv, sample.txt); no checkpoint "
                        "is needed")
    p.add_argument("--report_step", type=int, metavar="STEP",
                   help="with --report_only: report every run as it was at this step, with the exact evaluation its "
                        "training wrote there (training flag --exact_at STEP): the tables, figures and curves up to "
                        "it (default: the last step)")
    p.add_argument("--runs", default="runs", metavar="DIR", type=cli.path_value,
                   help="each run goes to DIR/<run name>, with its sample in DIR/<run name>/sample.txt "
                        "(default: runs)")
    p.add_argument("--out", metavar="DIR", type=cli.path_value,
                   help="where the tables, figures and samples go (default: the --runs DIR; --out plots/paper writes "
                        "the published comparison, and at the paper preset's settings the samples this repository "
                        "ships in model_outputs/)")
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


def main(argv=None):
    """Compare the models; exit code 2 with a one-line error for bad input, 1 when a training failed."""
    argv = sys.argv[1:] if argv is None else argv
    args, extra = build_parser().parse_known_args(argv)
    return exit_code(study.compare, args, extra, argv, interrupted=f"interrupted; {study.GO_ON}")


if __name__ == "__main__":
    sys.exit(main())
