"""Experiment tracking, off by default: Weights & Biases (--wandb_log) and TensorBoard (--tensorboard).

Neither package is imported unless its flag is given. Rank 0 alone tracks. At every evaluation, once its
checkpoint is written, each tracker gets the row that metrics.csv gained (losses, tokens per second) and the
learning rate, at the row's step; both write under --out_dir.
"""
import contextlib
import importlib
from pathlib import Path

from . import distributed
from .errors import UsageError, one_line

WANDB_PROJECT = "gpt_gat"  # the project the original logged to
# each tracking flag: the module its tracker imports, and the package that provides it
PACKAGES = {"wandb_log": ("wandb", "wandb"), "tensorboard": ("torch.utils.tensorboard", "tensorboard")}


def add_arguments(parser):
    """The tracking flags of the training scripts."""
    group = parser.add_argument_group("experiment tracking", "off by default; install the packages with "
                                                             "pip install wandb tensorboard")
    group.add_argument("--wandb_log", action="store_true",
                       help="log the run to Weights & Biases: its settings; the losses, learning rate and tokens/s "
                            "of every evaluation; the final checkpoint and sample. Its files go under "
                            "--out_dir/wandb; --resume continues the same W&B run. Needs wandb login, or "
                            "WANDB_MODE=offline to log without a network")
    group.add_argument("--wandb_project", default=WANDB_PROJECT, metavar="NAME",
                       help=f"the W&B project (default: {WANDB_PROJECT}, the original's)")
    group.add_argument("--wandb_run_name", metavar="NAME",
                       help="the W&B run's name (default: the run's, as in runs/<name>)")
    group.add_argument("--tensorboard", action="store_true",
                       help="write the losses, learning rate and tokens/s of every evaluation as TensorBoard event "
                            "files to --out_dir, so that tensorboard --logdir runs shows every run")


def import_trackers(args):
    """Import the package of each tracker that args asks for; UsageError naming the install command when one
    cannot be imported."""
    for flag, (module, package) in PACKAGES.items():
        if getattr(args, flag):
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise UsageError(f"--{flag} needs the {package} package, which cannot be imported ({one_line(e)}); "
                                 f"install it with pip install {package}, or drop --{flag}") from None


def scalars(row, learning_rate):
    """What the trackers log of a metrics.csv row: both losses, the learning rate and tokens per second (which
    the evaluation before any step has not)."""
    values = {"train/loss": row["train_loss"], "val/loss": row["val_loss"], "lr": learning_rate}
    if row["tokens_per_s"] != "":
        values["tokens_per_s"] = row["tokens_per_s"]
    return values


class Tracking:
    """The trackers of one run: a W&B run and a TensorBoard log directory, each when asked for; none by default."""

    def __init__(self, wandb_run=None, tensorboard_dir=None):
        self.wandb_run = wandb_run
        self.tensorboard_dir = tensorboard_dir
        self.writer = None  # made with the first row: after --overwrite has deleted the event files it replaces

    @property
    def wandb_run_id(self):
        return self.wandb_run.id if self.wandb_run else None

    def log(self, row, learning_rate):
        """Log a metrics.csv row and the learning rate at the row's step."""
        values = scalars(row, learning_rate)
        if self.wandb_run:
            self.wandb_run.log(values, step=row["step"])
        if self.tensorboard_dir:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.tensorboard_dir))
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, global_step=row["step"])
            self.writer.flush()

    def attach(self, *paths):
        """Attach files to the W&B run, such as the final checkpoint and the sample."""
        if self.wandb_run:
            for path in map(Path, paths):
                self.wandb_run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self, exit_code=0):
        if self.wandb_run:
            self.wandb_run.finish(exit_code=exit_code)
        if self.writer:
            self.writer.close()


@contextlib.contextmanager
def open_tracking(args, name, out_dir, config, wandb_run_id=None):
    """The Tracking that args asks for on rank 0 (on other ranks one that tracks nothing), closed with the exit
    code of the block. config is the W&B run's config; wandb_run_id the W&B run to continue, if any."""
    main = distributed.is_main_process()
    wandb_run = start_wandb(args, name, out_dir, config, wandb_run_id) if args.wandb_log and main else None
    tracking = Tracking(wandb_run, out_dir if args.tensorboard and main else None)
    try:
        yield tracking
    except BaseException as e:
        tracking.close(exit_code=getattr(e, "exit_code", 1))  # Interrupted's 130 or 143, else 1
        raise
    tracking.close()


def start_wandb(args, name, out_dir, config, run_id):
    """wandb.init of the run, its files under out_dir: a new W&B run, or the run_id one continued. A project name
    that W&B's settings refuse is refused as such first, before any login or network is tried."""
    import wandb

    try:
        wandb.Settings(project=args.wandb_project)
    except Exception as e:  # noqa: BLE001 - wandb.errors.UsageError, or pydantic's where a later wandb validates so
        raise UsageError(f"--wandb_project {args.wandb_project!r} is not a name W&B takes ({one_line(e)[:200]}); "
                         f"choose another") from None
    try:
        return wandb.init(project=args.wandb_project, name=args.wandb_run_name or name, config=config,
                          dir=str(out_dir), id=run_id, resume="allow" if run_id else None)
    except Exception as e:  # noqa: BLE001 - wandb raises many types: no login, no network, a project not ours
        raise UsageError(f"wandb.init failed ({one_line(e)[:200]}); log in with wandb login, set "
                         f"WANDB_MODE=offline, or drop --wandb_log") from None
