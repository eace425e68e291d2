"""A run directory (config.json, metrics.csv, ckpt.pt): the checks before a run starts there, reading it back."""
import csv
import json
from pathlib import Path

from . import distributed
from .checkpoint import load_checkpoint
from .errors import UsageError
from .files import atomic_write_text

METRICS_FIELDS = ("step", "train_loss", "val_loss", "elapsed_s", "tokens_per_s")
RUN_FILES = ("config.json", "metrics.csv", "ckpt.pt")
# What a resumed run may change: how long it trains, whether it is compiled, the graph layers' backend.
RESUMABLE_CHANGES = {"max_iters", "compile", "backend"}
TRAINING_STATE = {"optimizer", "step", "rng", "metrics", "elapsed_s", "config"}


def run_name(model, settings):
    """A run's name: the model's (a PyG layer, gpt or bigram), then its context graph and positions where they are
    not the original's, as in GATv2Conv_window-64_rel."""
    graph, pos = settings.get("graph", "full"), settings.get("pos", "abs")
    parts = [model, graph.replace(":", "-").replace(",", "+") if graph != "full" else "", pos if pos != "abs" else ""]
    return "_".join(p for p in parts if p)


class MetricsLog:
    """metrics.csv in the run directory, one row per evaluation, flushed as it is written."""

    def __init__(self, path, rows=()):
        """Start the file with the header and rows (those of the checkpoint when resuming)."""
        self.path = Path(path)
        with self.path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(METRICS_FIELDS)
            writer.writerows([row[k] for k in METRICS_FIELDS] for row in rows)

    def append(self, row):
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in METRICS_FIELDS])


def open_run_dir(out_dir, config, vocab, resume=False, overwrite=False):
    """Check out_dir, then write config.json there; returns the checkpoint to resume from, or None.

    Without resume or overwrite, a directory that holds a run (finished, unfinished or of another
    configuration) is refused. With resume, ckpt.pt must continue the run that config and vocab describe.
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other; pass one of them")
    checkpoint = None
    if resume:
        checkpoint = resumable_checkpoint(out_dir, config, vocab)
    elif not overwrite and holds_run(out_dir):
        raise UsageError(f"{out_dir} {describe_run(out_dir, config)}")
    distributed.barrier()  # every rank has looked at out_dir before rank 0 changes it
    if distributed.is_main_process():
        if overwrite:
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
        atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return checkpoint


def holds_run(out_dir):
    """Whether out_dir holds any file of a run (config.json, metrics.csv or ckpt.pt)."""
    return any((Path(out_dir) / name).exists() for name in RUN_FILES)


def describe_run(out_dir, config):
    """What the run in out_dir is and how to go on, for a refusal to replace it."""
    old = read_config(out_dir)
    if is_finished(out_dir, old):
        return ("holds a finished run; pass --overwrite to replace it, --resume with a larger --max_iters to "
                "train it further, or choose another --out_dir")
    if old is None:
        return ("holds files of a run without a readable config.json; pass --overwrite to replace them or choose "
                "another --out_dir")
    differences = config_differences(old, config)
    if differences:
        return (f"holds a run of another configuration ({'; '.join(differences)}); pass --overwrite to "
                f"replace it or choose another --out_dir")
    return ("holds an unfinished run of this configuration; pass --resume to continue it, --overwrite to "
            "start again, or choose another --out_dir")


def resumable_checkpoint(out_dir, config, vocab):
    """The checkpoint in out_dir after checking that it continues the run described by config and vocab."""
    path = out_dir / "ckpt.pt"
    if not path.is_file():
        raise UsageError(f"nothing to resume: no checkpoint at {path}; drop --resume to start a new run")
    checkpoint = load_checkpoint(path)
    missing = TRAINING_STATE - set(checkpoint)
    if missing:
        raise UsageError(f"{path} holds no training state to resume (no {', '.join(sorted(missing))}); "
                         f"start again with --overwrite")
    if checkpoint["vocab"] != list(vocab):
        raise UsageError(f"cannot resume {path}: its vocabulary ({len(checkpoint['vocab'])} characters) is not "
                         f"the one of --data ({len(vocab)} characters); pass the --data of the original run")
    differences = config_differences(checkpoint["config"], config)
    if differences:
        raise UsageError(f"cannot resume {path}: {'; '.join(differences)}; pass the flags of the original run "
                         f"or start again with --overwrite")
    processes = len(checkpoint["rng"])
    if processes != distributed.world_size():
        raise UsageError(f"cannot resume {path}: it was trained by {processes} process(es), this run has "
                         f"{distributed.world_size()}; resume it with {processes} process(es) in all")
    if checkpoint["step"] >= config["settings"]["max_iters"]:
        raise UsageError(f"the run in {out_dir} finished at step {checkpoint['step']}; pass a --max_iters above "
                         f"{checkpoint['step']} to train it further")
    return checkpoint


def config_differences(old, new):
    """'key was X, now Y' for each setting of the model and training that differs between two run configs."""
    def comparable(config):
        fields = {"name": config.get("name"), "seed": config.get("seed"),
                  **config.get("model_config", {}), **config.get("settings", {})}
        return {k: v for k, v in fields.items() if k not in RESUMABLE_CHANGES}

    old, new = comparable(old), comparable(new)
    return [f"{k} was {old.get(k)}, now {new.get(k)}" for k in {**old, **new} if old.get(k) != new.get(k)]


def read_metrics(out_dir):
    """The rows of a run's metrics.csv as dicts of numbers ([] when there is none)."""
    path = Path(out_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(f)]


def read_config(out_dir):
    """A run's config.json as a dict, or None when it is missing or unreadable."""
    try:
        config = json.loads((Path(out_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_finished(out_dir, config):
    """Whether the run in out_dir, of config (its read_config), evaluated after its last step: its metrics
    reach settings max_iters."""
    rows = read_metrics(out_dir)
    if not rows or config is None:
        return False
    return rows[-1]["step"] == config.get("settings", {}).get("max_iters")
