"""Training the planned runs of a comparison (compare.py): in this process one after the other, or by their
training scripts in child processes (gnngpt/jobs.py; gnngpt/slurm.py takes training_command for its jobs); and
the exact loss and sample that a reused run lacks, from its checkpoint."""
import shlex
import sys

import torch

from . import cli
from .errors import UsageError, fitting, one_line
from .evaluation import (
    batch_advice,
    describe_evaluation,
    exact_evaluation,
    has_halves,
    in_batches,
    read_eval,
    read_loss_by_position,
    run_validation_split,
    write_eval,
)
from .jobs import Job, run_jobs
from .results import load_run_model
from .rundir import ROOT, has_checkpoint, read_config
from .sampling import sample_path, write_model_output
from .train import set_rng_state


def training_argv(run, state):
    """The training script's arguments for a run in state "new", "resume", "restart", "replace" or "lost"."""
    overwrite = {state: ["--overwrite"] for state in ("restart", "replace", "lost")}
    return run.argv + {"resume": ["--resume"], **overwrite}.get(state, [])


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


def train_in_processes(runs, states, at_once, planned):
    """Train the runs by their training scripts in child processes, at_once at a time (see jobs.run_jobs; planned:
    how many runs the comparison has, those reused included).

    Returns the exit code of a stop by SIGINT or SIGTERM (0 when none) and the exit code of each failed run.
    """
    jobs = [Job(r.name, training_command(r, states[r.name]), r.out_dir, r.expected["settings"]["max_iters"],
                resume=states[r.name] == "resume", device=r.expected["device"])
            for r in runs]
    stopped = run_jobs(jobs, at_once, planned)
    return stopped, {job.name: job.exit_code for job in jobs if job.state == "failed"}


def write_missing_exact_loss(run):
    """Write the run's eval.json and loss_by_position.csv from its checkpoint when it has no eval.json of its last
    step, or one without the halves of the validation split or without the loss by position (runs from before
    trainings wrote them). A run without its checkpoint keeps what it has, as long as it has an eval.json."""
    config = read_config(run.out_dir)
    record = read_eval(run.out_dir, config["settings"]["max_iters"])
    if record is not None and (complete_eval(run.out_dir, record) or not has_checkpoint(run.out_dir)):
        return
    device = reading_device(run)
    model, tokenizer, _ = load_run_model(run.out_dir, device)
    batch_size = config["settings"]["batch_size"]
    smaller = (f"write it in smaller batches with python evaluate.py --out_dir {shlex.quote(str(run.out_dir))} "
               f"--write --batch_size {batch_size // 2}")
    with fitting(f"the exact evaluation of {run.out_dir} {in_batches(batch_size)} does not fit in memory",
                 f"{batch_advice(batch_size, smaller)}, then run the same command again"):
        data = run_validation_split(config, tokenizer.chars, "train the run again with --overwrite")
        result = exact_evaluation(model, data, config["settings"], device)
    write_eval(run.out_dir, result, config["settings"]["max_iters"])
    print(f"{run.name}: {describe_evaluation(result)} (computed from its checkpoint)")


def complete_eval(out_dir, record):
    """Whether a run's exact evaluation has all that trainings write now: the halves and the loss by position."""
    return has_halves(record) and read_loss_by_position(out_dir) is not None


def reading_device(run):
    """The device a reused run's checkpoint is read on: the run's own, or the CPU where this machine lacks it (as
    a login node lacks the GPU of a SLURM job)."""
    try:
        return cli.resolve_device(torch.device(run.expected["device"]).type)
    except UsageError:
        return torch.device("cpu")


def write_missing_own_sample(run):
    """Write the run's own sample (sampling.sample_path) from its checkpoint when it has none, as a run stopped
    after its last step lacks it; a run without its checkpoint keeps what it has."""
    path = sample_path(run.out_dir)
    if not path.exists() and has_checkpoint(run.out_dir):
        write_missing_sample(run, path)


def write_missing_sample(run, path):
    """Write the run's sample to path from its checkpoint, drawn as its training draws it: from the random states
    saved with its last step (on the run's own device; another device's draws differ), or from its seed where the
    checkpoint holds the weights alone."""
    device = reading_device(run)
    model, tokenizer, info = load_run_model(run.out_dir, device)
    if info["rng"] is None:
        torch.manual_seed(run.seed)
    else:
        set_rng_state(info["rng"])
    write_model_output(model, tokenizer, path, device)
    print(f"wrote {path}")
