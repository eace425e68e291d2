"""A run directory (config.json, metrics.csv, ckpt.pt): the lock of the training that writes it, the checks
before a run starts there, reading it back."""
import contextlib
import csv
import errno
import fcntl
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from . import distributed
from .checkpoint import load_checkpoint
from .errors import UsageError, not_utf8
from .files import atomic_write_text, first_missing, remove_leftovers, write_failure, write_fix

# train_s: seconds of training steps alone (evaluations and checkpoints excluded); tokens: training tokens seen
METRICS_FIELDS = ("step", "train_loss", "val_loss", "elapsed_s", "tokens_per_s", "train_s", "tokens")
# the cells every row fills: tokens_per_s is empty where no step was timed before the row, and runs from before
# train_s and tokens were recorded have none
FILLED_METRICS = ("step", "train_loss", "val_loss", "elapsed_s")
EVAL_FILE = "eval.json"  # the exact validation loss of the final checkpoint (see evaluation.py)
POSITION_FILE = "loss_by_position.csv"  # the same loss at each offset of the windows (see evaluation.py)
SNAPSHOT_FILES = ("eval_step*.json", "loss_by_position_step*.csv")  # the same at earlier steps (--exact_at)
SAMPLE_FILE = "sample.txt"  # the sample the training writes at its end (see sampling.sample_path)
RUN_FILES = ("config.json", "metrics.csv", "ckpt.pt", EVAL_FILE)
TENSORBOARD_FILES = "events.out.tfevents.*"  # --overwrite deletes these too: they would mix with the new run's
WANDB_DIR = "wandb"  # where W&B keeps its runs' files (--wandb_log): each run in a folder of its own
LOCK_FILE = ".lock"
RUNS = Path("runs")  # where the scripts put each run by default, as RUNS/<name>, in the working directory
ROOT = Path(__file__).resolve().parents[1]  # the repository: its training scripts, and what it ships
SHIPPED_REPORTS = ROOT / "plots"  # the reports and the small files of their runs that the repository ships
SHIPPED_SAMPLES = ROOT / "model_outputs"  # the published comparison's samples
PUBLISHED_REPORT = SHIPPED_REPORTS / "paper"  # the published comparison's report, whose samples are SHIPPED_SAMPLES
# What a resumed run may change: how long it trains, whether it is compiled, the graph layers' backend.
RESUMABLE_CHANGES = {"max_iters", "compile", "backend"}
TRAINING_STATE = {"optimizer", "step", "rng", "metrics", "elapsed_s", "config"}


def eval_files(out_dir, at=None):
    """The paths of a run's exact evaluation: eval.json and loss_by_position.csv of its last step, or (at) the
    snapshot of an earlier step that training's --exact_at wrote."""
    out_dir = Path(out_dir)
    if at is None:
        return out_dir / EVAL_FILE, out_dir / POSITION_FILE
    return out_dir / f"eval_step{at}.json", out_dir / f"loss_by_position_step{at}.csv"


def run_name(model, settings):
    """A run's name: the model's (a PyG layer, gpt or bigram), then its context graph and positions where they are
    not the original's, as in GATv2Conv_window-64_rel."""
    graph, pos = settings.get("graph", "full"), settings.get("pos", "abs")
    parts = [model, graph.replace(":", "-").replace(",", "+") if graph != "full" else "", pos if pos != "abs" else ""]
    return "_".join(p for p in parts if p)


def default_run_dir(name):
    """The run directory of the run called name when no --out_dir is given."""
    return RUNS / name


def unwritable(path, flag):
    """The one-line refusal when path cannot be a directory this process writes in: a file in the way (see
    file_in_the_way), or a nearest existing folder in which no file can be made. "" else; nothing is left behind."""
    if refusal := file_in_the_way(path, flag):
        return refusal
    existing = nearest_existing(Path(path).absolute())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"{flag} {path} cannot be written ({existing}: {e.strerror}); choose a directory you can write"
    return ""


def file_in_the_way(path, flag):
    """The one-line refusal when path, or a folder above it, is a file, or a name in it is longer than the file
    system allows: then path can be no directory. "" else."""
    path = Path(path)
    existing = nearest_existing(path)
    if existing is None:
        return ""
    if existing.is_dir():
        limit = name_limit(existing)
        if limit and any(len(os.fsencode(name)) > limit for name in path.parts):
            return (f"{flag} {path} has a name longer than the {limit} bytes its file system allows; choose "
                    f"another {flag}")
        return ""
    where = "is a file" if existing == path else f"lies under {existing}, a file"
    return f"{flag} {path} {where}, not a directory; choose another {flag}"


def name_limit(directory):
    """The most bytes a file's name may have in directory, an existing one (None where its file system does not
    say)."""
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX")
    except OSError:
        return None
    return limit if limit > 0 else None


def nearest_existing(path):
    """The first of path and the folders above it that exists (None when none does: the working directory of a
    relative path was removed); a name too long for the file system does not exist."""
    for candidate in (path, *path.parents):
        try:
            if candidate.exists():
                return candidate
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                raise
    return None


class MetricsLog:
    """metrics.csv in the run directory, one row per evaluation, flushed as it is written."""

    def __init__(self, path, rows=()):
        """Start the file with the header and rows (those of the checkpoint when resuming)."""
        self.path = Path(path)
        self.write("w", [METRICS_FIELDS, *([row.get(k, "") for k in METRICS_FIELDS] for row in rows)])

    def append(self, row):
        self.write("a", [[row.get(k, "") for k in METRICS_FIELDS]])

    def write(self, mode, lines):
        """Write lines of cells in mode "w" or "a"; UsageError when the disk refuses (saying to train again where no
        checkpoint is there: the training then leaves no run, see hold_run_dir)."""
        try:
            with self.path.open(mode, newline="") as f:
                csv.writer(f).writerows(lines)
        except OSError as e:
            go_on = "--resume from the last checkpoint" if has_checkpoint(self.path.parent) else "train again"
            raise UsageError(f"{write_failure(self.path, e)} or choose another --out_dir, then {go_on}") from None


@contextlib.contextmanager
def hold_run_dir(out_dir, resume=False):
    """Hold out_dir for one training while the block runs: the only process that writes it.

    Rank 0 creates out_dir (unless resuming, which needs it) and takes an exclusive flock on out_dir/.lock,
    with its process id written there; the kernel releases the lock when the process ends, however it ends, so
    a killed training never blocks the next. A refusal (another process holds it; out_dir is a file or cannot
    be written) is a UsageError on every rank, before anything is written. A block that fails before it writes
    a run file (a refusal of the run there, a tracker that does not start, an interruption) leaves out_dir as it
    found it; one that fails before a checkpoint is there (memory running out or an interruption in the first
    evaluation, say) leaves no run file behind either: rank 0 removes those it wrote, which hold nothing trained,
    and the W&B folder where this block made it (in one that was there, the failed W&B run's folder stays).
    """
    lock = RunDirLock(out_dir)
    refusal = distributed.from_main(lambda: lock.take(resume))
    if refusal:
        raise UsageError(refusal)
    before = run_file_times(out_dir)
    wandb_dir = Path(out_dir) / WANDB_DIR
    wandb_was_there = wandb_dir.exists()
    try:
        yield
    except BaseException:
        if distributed.is_main_process() and not has_checkpoint(out_dir):
            for name, was, now in zip(RUN_FILES, before, run_file_times(out_dir)):
                if now not in (None, was):  # written by this block
                    (Path(out_dir) / name).unlink()
            if not wandb_was_there:  # the W&B run that this block started, closed by now
                shutil.rmtree(wandb_dir, ignore_errors=True)
        if run_file_times(out_dir) == before or not holds_run(out_dir):
            lock.discard()
        raise
    finally:
        lock.release()


def run_file_times(out_dir):
    """The modification time of each run file in out_dir (None where there is none)."""
    paths = (Path(out_dir) / name for name in RUN_FILES)
    return [p.stat().st_mtime_ns if p.exists() else None for p in paths]


class RunDirLock:
    """The exclusive flock of out_dir/.lock held by the training that writes out_dir."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.fd = None
        self.created = None  # the outermost directory that take() created
        self.created_lock = False  # whether take() created the lock file
        self.found = None  # the lock file's bytes and times as take() found it there, for discard() to put back

    def take(self, resume):
        """Take the lock; "" when it is taken, else why not (out_dir is then unchanged)."""
        out_dir = self.out_dir
        if refusal := file_in_the_way(out_dir, "--out_dir"):
            return refusal
        if resume and not out_dir.exists():
            return nothing_to_resume(out_dir / "ckpt.pt")
        absolute = Path(os.path.abspath(out_dir))  # "..", resolved as mkdir resolves it
        self.created = first_missing(absolute)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"cannot create --out_dir {out_dir} ({e.strerror}); choose another --out_dir"
        self.created_lock = not (out_dir / LOCK_FILE).exists()
        try:
            fd = os.open(out_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            return cannot_write(out_dir, e)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd)
            os.close(fd)
            return in_use(out_dir, holder, "wait for it to end or choose another --out_dir")
        if not self.created_lock:
            found = os.fstat(fd)
            self.found = os.pread(fd, found.st_size, 0), (found.st_atime_ns, found.st_mtime_ns)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return ""

    def discard(self):
        """Undo what take() did (held by this process): put back the lock file it found, or remove the one it
        created, and the directories it created where they are empty."""
        if self.fd is None:
            return
        if not self.created_lock:
            content, times = self.found
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, content, 0)
            with contextlib.suppress(OSError):  # a lock file of another owner takes no times from this process
                os.utime(self.fd, ns=times)
            return
        (self.out_dir / LOCK_FILE).unlink(missing_ok=True)
        absolute = Path(os.path.abspath(self.out_dir))
        for directory in [absolute, *absolute.parents] if self.created else []:
            with contextlib.suppress(OSError):  # not empty: another file is there
                directory.rmdir()
            if directory == self.created:
                break

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def refuse_if_held(out_dir, fix):
    """UsageError (ending with fix) when a training holds out_dir, so that a reader never sees a run mid-write."""
    try:
        fd = os.open(Path(out_dir) / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: no training has held out_dir
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released at once, by the close below
    except BlockingIOError:
        raise UsageError(in_use(out_dir, lock_holder(fd), fix)) from None
    finally:
        os.close(fd)


def lock_holder(fd):
    """The process id written in a held lock file ("?" in the instant before its holder writes it)."""
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"


def in_use(out_dir, pid, fix):
    return f"{out_dir} is in use by a training in process {pid}; {fix}"


def remove_run_leftovers(out_dir):
    """Remove what a process killed while it wrote a run's files in out_dir left of them (files.remove_leftovers);
    for a run that no other process writes: one starting to train, or a finished one that a comparison reuses."""
    remove_leftovers(out_dir, (*RUN_FILES, POSITION_FILE, SAMPLE_FILE, *SNAPSHOT_FILES))


def check_run_dir(out_dir, config, vocab, resume=False, overwrite=False):
    """Check that a training of config and vocab may start in out_dir; returns the checkpoint to resume from,
    or None. Writes nothing.

    Without resume or overwrite, a directory that holds a run (finished, unfinished or of another
    configuration) is refused. With resume, ckpt.pt must continue the run that config and vocab describe (the
    scripts refuse resume with overwrite before this). A finished run that the repository ships (in_shipped_plots)
    is neither replaced nor resumed.
    """
    out_dir = Path(out_dir)
    if shipped_folder(out_dir):
        raise UsageError(f"{out_dir} is a folder where this repository keeps reports, samples or runs that it ships, "
                         f"not a run directory; choose another --out_dir")
    if (resume or overwrite) and in_shipped_plots(out_dir) and is_finished(out_dir, read_config(out_dir)) and \
            has_final_files(out_dir):
        raise UsageError(f"{out_dir} holds a finished run that this repository ships in {SHIPPED_REPORTS}, which "
                         f"only the command in its report writes; choose another --out_dir")
    if resume:
        return resumable_checkpoint(out_dir, config, vocab)
    if not overwrite and holds_run(out_dir):
        raise UsageError(f"{out_dir} {describe_run(out_dir, config)}")
    return None


def start_run_dir(out_dir, config, overwrite=False):
    """Write config.json to out_dir, after deleting the run files there with overwrite, TensorBoard's included,
    and eval.json, loss_by_position.csv and sample.txt in any case: they come from the final checkpoint, and a run
    that trains has none yet (rank 0 writes), and what a training killed while it wrote left of its files. A
    metrics.csv that training could not write again is refused first, so that a refused --resume changes
    nothing."""
    out_dir = Path(out_dir)
    distributed.barrier()  # every rank has looked at out_dir before rank 0 changes it
    if not distributed.is_main_process():
        return
    replaced = [out_dir / name for name in RUN_FILES] + [p for pattern in (TENSORBOARD_FILES, *SNAPSHOT_FILES)
                                                          for p in sorted(out_dir.glob(pattern))] if overwrite else []
    replaced += [out_dir / EVAL_FILE, out_dir / POSITION_FILE, out_dir / SAMPLE_FILE]
    metrics = out_dir / "metrics.csv"
    try:
        if metrics.exists() and not overwrite:
            metrics.open("a").close()  # the file training writes first: refused before anything here changes
    except OSError as e:
        raise UsageError(f"{write_failure(metrics, e, 'it')} or choose another --out_dir") from None
    try:
        remove_run_leftovers(out_dir)
        for path in replaced:
            path.unlink(missing_ok=True)
        atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    except OSError as e:
        raise UsageError(cannot_write(out_dir, e)) from None


def cannot_write(out_dir, error):
    fix = write_fix(error, "it")
    return f"cannot write to --out_dir {out_dir} ({error.strerror}); {fix} or choose another --out_dir"


def in_shipped_plots(path):
    """Whether path lies in SHIPPED_REPORTS, among the reports and runs this repository ships."""
    return Path(path).resolve().is_relative_to(SHIPPED_REPORTS.resolve())


def shipped_folder(path):
    """Whether path is a folder where this repository keeps what it ships other than one run: SHIPPED_REPORTS or
    SHIPPED_SAMPLES itself, a folder in SHIPPED_SAMPLES, or a folder in SHIPPED_REPORTS of samples (model_outputs),
    of a report (a .md file) or of runs (folders with a config.json)."""
    path = Path(path).resolve()
    if path == SHIPPED_REPORTS.resolve() or path.is_relative_to(SHIPPED_SAMPLES.resolve()):
        return True
    return in_shipped_plots(path) and path.is_dir() and (path.name == "model_outputs" or any(
        (entry.suffix == ".md" and entry.is_file()) or (entry / "config.json").is_file() for entry in path.iterdir()))


def holds_run(out_dir):
    """Whether out_dir holds any file of a run (config.json, metrics.csv, ckpt.pt or eval.json)."""
    return any((Path(out_dir) / name).exists() for name in RUN_FILES)


def describe_run(out_dir, config):
    """What the run in out_dir is and how to go on, for a refusal to replace it."""
    old = read_config(out_dir)
    finished, checkpointed = is_finished(out_dir, old), has_checkpoint(out_dir)
    if finished and not checkpointed:
        return ("holds a finished run of which only the small files are kept (no ckpt.pt); pass --overwrite to train "
                "it again or choose another --out_dir")
    if finished and not has_final_files(out_dir):
        what = {EVAL_FILE: f"its exact validation loss ({EVAL_FILE})", SAMPLE_FILE: f"its sample ({SAMPLE_FILE})"}
        missing = [what[name] for name in missing_final_files(out_dir)]
        return (f"holds a run stopped after its last step, before {' and '.join(missing)} "
                f"{'was' if len(missing) == 1 else 'were'} written; pass --resume to write "
                f"{'it' if len(missing) == 1 else 'them'}, or --overwrite to replace it")
    if finished:
        return ("holds a finished run; pass --overwrite to replace it, --resume with a larger --max_iters to "
                "train it further, or choose another --out_dir")
    if old is None:
        return ("holds files of a run without a readable config.json; pass --overwrite to replace them or choose "
                "another --out_dir")
    differences = config_differences(old, config)
    if differences:
        return (f"holds a run of another configuration ({'; '.join(differences)}); pass --overwrite to "
                f"replace it or choose another --out_dir")
    if stopped_before_first_checkpoint(out_dir):
        return ("holds a run of this configuration that stopped before its first checkpoint; pass --overwrite to "
                "start it again or choose another --out_dir")
    if not checkpointed:
        return ("holds an unfinished run of this configuration without its checkpoint (ckpt.pt); pass --overwrite "
                "to start it again or choose another --out_dir")
    return ("holds an unfinished run of this configuration; pass --resume to continue it, --overwrite to "
            "start again, or choose another --out_dir")


def resumable_checkpoint(out_dir, config, vocab):
    """The checkpoint in out_dir after checking that it continues the run described by config and vocab."""
    path = out_dir / "ckpt.pt"
    if not path.is_file():
        raise UsageError(nothing_to_resume(path))
    checkpoint = load_checkpoint(path)
    missing = TRAINING_STATE - set(checkpoint)
    if missing:
        raise UsageError(f"{path} holds no training state to resume (no {', '.join(sorted(missing))}); "
                         f"start again with --overwrite")
    if checkpoint["vocab"] != list(vocab):
        raise UsageError(f"cannot resume {path}: its vocabulary ({len(checkpoint['vocab'])} characters) is not "
                         f"the one of --data ({len(vocab)} characters); pass the --data of the original run")
    trained_on = checkpoint["config"].get("data_sha256")  # (runs from before it was recorded have none)
    if trained_on and trained_on != config["data_sha256"]:
        raise UsageError(f"cannot resume {path}: --data {config['data']} is not the text it was trained on (that of "
                         f"{checkpoint['config'].get('data')}, by its SHA-256); pass the --data of the original run")
    differences = config_differences(with_original_graph(checkpoint["config"]), config)
    if differences:
        raise UsageError(f"cannot resume {path}: {'; '.join(differences)}; pass the flags of the original run "
                         f"or start again with --overwrite")
    processes = len(checkpoint["rng"])
    if processes != distributed.world_size():
        raise UsageError(f"cannot resume {path}: it was trained by {processes} process(es), this run has "
                         f"{distributed.world_size()}; resume it with {processes} process(es) in all")
    step, rows, max_iters = checkpoint["step"], checkpoint["metrics"], config["settings"]["max_iters"]
    # at max_iters, a run is done once evaluated there, logged in metrics.csv and scored with its sample written;
    # stopped before, it resumes to do what is left (metrics.csv is written again from the checkpoint's rows)
    if step == max_iters and rows and rows[-1]["step"] == step and has_final_files(out_dir) and \
            is_finished(out_dir, config):
        raise UsageError(f"the run in {out_dir} finished at step {step}; pass a --max_iters above {step} to train it "
                         f"further")
    if step > max_iters:
        raise UsageError(f"the run in {out_dir} is at step {step}, past --max_iters {max_iters}; pass a --max_iters "
                         f"above {step} to train it further")
    return checkpoint


def nothing_to_resume(path):
    if not holds_run(path.parent):
        return f"nothing to resume: no checkpoint at {path}; drop --resume to start a new run"
    if stopped_before_first_checkpoint(path.parent):
        return (f"nothing to resume: no checkpoint at {path}, where a run stopped before its first; pass "
                "--overwrite instead of --resume to start it again")
    return (f"nothing to resume: no checkpoint at {path}, where only the small files of a run are kept; pass "
            "--overwrite instead of --resume to train it again")


def stopped_before_first_checkpoint(out_dir):
    """Whether the run in out_dir stopped before it wrote its first checkpoint: there is none, and its metrics
    reach no step past 0 (the evaluation before training writes its row, then the checkpoint)."""
    return not has_checkpoint(out_dir) and all(row["step"] == 0 for row in read_metrics(out_dir))


def missing_final_files(out_dir):
    """The names of what a run writes after its last step, its exact loss (eval.json) and sample, that out_dir
    lacks."""
    return [name for name in (EVAL_FILE, SAMPLE_FILE) if not (Path(out_dir) / name).is_file()]


def has_final_files(out_dir):
    """Whether out_dir holds what a run writes after its last step (see missing_final_files)."""
    return not missing_final_files(out_dir)


def has_checkpoint(out_dir):
    """Whether out_dir holds a run's checkpoint (ckpt.pt)."""
    return (Path(out_dir) / "ckpt.pt").is_file()


def config_differences(old, new):
    """'key was X, now Y' for each setting of the model and training that differs between two run configs."""
    def comparable(config):
        fields = {"name": config.get("name"), "seed": config.get("seed"),
                  **config.get("model_config", {}), **config.get("settings", {})}
        return {k: v for k, v in fields.items() if k not in RESUMABLE_CHANGES}

    old, new = comparable(old), comparable(new)
    return [f"{k} was {old.get(k)}, now {new.get(k)}" for k in {**old, **new} if old.get(k) != new.get(k)]


def read_metrics(out_dir):
    """The rows of a run's metrics.csv as dicts of numbers ([] when there is none): each fills FILLED_METRICS,
    with a whole step, and holds finite numbers alone; and the last ends its line, as every row written whole does
    (a full disk cuts one short, as its writer leaves it for an instant, and an editor may drop the line end)."""
    path = Path(out_dir) / "metrics.csv"
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            text = f.read()
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except UnicodeDecodeError as e:
        raise not_utf8(path, e, f"repair it or delete {path.parent}") from None
    except csv.Error as e:  # a cell past the csv module's limit, say
        raise UsageError(f"{path} is not CSV ({e}); repair it or delete {path.parent}") from None
    if rows and not text.endswith("\n"):
        raise UsageError(f"{path} ends in a row without its line end, as a full disk or an editor leaves one; end "
                         f"the row if it is whole, else delete it and train on from the checkpoint (--resume, or "
                         f"the comparison again)")
    try:
        values = [{k: float(v) if v else None for k, v in row.items()} for row in rows]
    except (TypeError, ValueError):  # a value that is no number, or a row longer than the header (key None)
        values = None
    if values is None or not all(map(well_formed_metrics, values)):
        filled = ", ".join(FILLED_METRICS)
        raise UsageError(f"{path} has a row that is not finite numbers under its header, with {filled} filled and "
                         f"a whole step; repair it or delete {path.parent}")
    return values


def well_formed_metrics(row):
    """Whether row (numbers, or None where a cell is empty) fills FILLED_METRICS, with a whole step, and every
    number in it is finite."""
    return (all(row.get(k) is not None for k in FILLED_METRICS) and row["step"].is_integer() and row["step"] >= 0
            and all(math.isfinite(v) for v in row.values() if v is not None))


def read_config(out_dir):
    """A run's config.json as a dict, or None when it is missing or unreadable, or its settings or model_config
    are no dict."""
    try:
        config = json.loads((Path(out_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not all(isinstance(config.get(key, {}), dict)
                                               for key in ("settings", "model_config")):
        return None
    return with_original_graph(config)


def with_original_graph(config):
    """config, where it is a GPT's from before context graphs and positions were settings, with the original's
    (the complete graph, absolute positions) filled in, as the model it describes has."""
    if config.get("arch") != "gpt" or "graph" in config.get("settings", {}):
        return config
    original = {"graph": "full", "pos": "abs"}
    return {**config, "settings": {**config.get("settings", {}), **original},
            "model_config": {**config.get("model_config", {}), **original}}


def is_finished(out_dir, config):
    """Whether the run in out_dir, of config (its read_config), evaluated after its last step: its metrics
    reach settings max_iters."""
    rows = read_metrics(out_dir)
    if not rows or config is None:
        return False
    return rows[-1]["step"] == config.get("settings", {}).get("max_iters")
