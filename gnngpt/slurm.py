"""Each unfinished run of a comparison as a SLURM job, submitted and followed through submitit
(compare.py --launcher slurm).

A job runs the run's training script as --jobs N would, its output in <run dir>/train.log. submitit's files
(each job's own log among them) go to <runs>/slurm, with jobs.json, the record of which job trains which run:
the same command run again waits for a recorded job still queued or running instead of submitting it again.
submitit is optional: it is imported only here, and only for --launcher slurm.
"""
import contextlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError, check_count, one_line
from .files import atomic_write_text, first_missing
from .jobs import Job, SignalsReceived, StatusBoard, failure_message, latest_metrics
from .plan import value_differences
from .processes import run_training
from .rundir import ROOT  # on each job's PYTHONPATH: the job imports processes.run_training

RECORD = "jobs.json"
POLL_S = 1.0  # how often the jobs' result files and metrics.csv are read and the status refreshed
STATE_S = 60  # how often SLURM's accounting (sacct) is asked at least for the states of the jobs
LIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}  # not ended
RUNNING = {"RUNNING", "COMPLETING"}
WAITING = ("queued", "training")  # the states of a job not yet ended, as the status lines show them
FLAG_OF = {"partition": "--slurm_partition", "time": "--slurm_time", "gpus-per-node": "--slurm_gpus",
           "cpus-per-task": "--slurm_cpus"}
SET_BY_SUBMITIT = ("array", "output", "error", "open-mode", "signal")


@dataclass
class Launcher:
    """What --launcher slurm and the --slurm_* flags ask for."""
    folder: Path  # <runs>/slurm
    device: str  # where each training runs: --device, or for auto cuda with --slurm_gpus and cpu without
    parameters: dict  # of submitit's SlurmExecutor
    threads: int = None  # OMP_NUM_THREADS of each training: --slurm_cpus


@dataclass
class ClusterJob(Job):
    """A run's training as a submitit job. Its log is train.log, or the job's own when it ended without a result."""
    submitted: object = None  # the submitit job
    job_log: Path = None

    @property
    def log_path(self):
        return self.job_log or super().log_path


def options(args):
    """The Launcher of compare.py's flags, all checked before anything is written; None for --launcher local."""
    flags = {"--slurm_partition": args.slurm_partition, "--slurm_time": args.slurm_time,
             "--slurm_gpus": args.slurm_gpus, "--slurm_cpus": args.slurm_cpus, "--slurm_args": args.slurm_args}
    given = [flag for flag, value in flags.items() if value is not None]
    if args.launcher != "slurm":
        if given:
            raise UsageError(f"{given[0]} is an option of the SLURM jobs; add --launcher slurm or drop {given[0]}")
        return None
    if args.jobs != 1:
        raise UsageError("--jobs trains several runs at once on this machine; with --launcher slurm every run is a "
                         "job of its own: drop --jobs")
    try:
        import submitit  # noqa: F401 - only checked here
    except ImportError as e:
        raise UsageError(f"--launcher slurm needs the submitit package, which cannot be imported ({e}); install it "
                         f"with pip install submitit, or drop --launcher slurm") from None
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if missing:
        raise UsageError(f"--launcher slurm needs SLURM's {' and '.join(missing)}, not found on the PATH; run "
                         f"compare.py on a login node of the cluster, or drop --launcher slurm to train here")
    gpus, cpus = args.slurm_gpus or 0, args.slurm_cpus
    check_count("--slurm_gpus", gpus, least=0)
    if cpus is not None:
        check_count("--slurm_cpus", cpus)
    parameters = {"job_name": "compare", "stderr_to_stdout": True, "partition": args.slurm_partition,
                  "time": None if args.slurm_time is None else minutes(args.slurm_time),  # None: the partition's
                  "cpus_per_task": cpus, "additional_parameters": sbatch_options(args.slurm_args or ""),
                  "setup": [f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]}
    if gpus:
        parameters["gpus_per_node"] = gpus
    device = args.device if args.device != "auto" else "cuda" if gpus else "cpu"
    return Launcher(Path(args.runs) / "slurm", device, parameters, cpus)


def minutes(text):
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if match is None:
        raise UsageError(f"--slurm_time {text!r} is not a SLURM time; write minutes, H:MM:SS or D-HH:MM, as in "
                         f"90, 4:00:00 or 1-12:00")
    days, first, second, third = (int(part) if part else 0 for part in match.groups())
    if match[1] is not None:  # D-H, D-H:M, D-H:M:S
        seconds = ((days * 24 + first) * 60 + second) * 60 + third
    elif match[4] is not None:  # H:M:S
        seconds = (first * 60 + second) * 60 + third
    else:  # M, M:S
        seconds = first * 60 + second
    if seconds == 0:
        raise UsageError(f"--slurm_time {text!r} is no time at all; give each job the time its training needs")
    return math.ceil(seconds / 60)


def sbatch_options(text):
    """--slurm_args KEY=VALUE,... as sbatch options; a value may hold commas (mail-type=BEGIN,END): a new pair
    starts only at a comma followed by KEY=."""
    options = {}
    for item in re.split(r",(?=[A-Za-z][\w-]*=)", text) if text.strip() else []:
        key, equals, value = item.strip().partition("=")
        key = key.replace("_", "-")
        if not equals or not re.fullmatch(r"[A-Za-z][\w-]*", key) or not value:
            raise UsageError(f"--slurm_args takes KEY=VALUE pairs separated by commas, as in "
                             f"account=abc,constraint=a100; got {item.strip()!r}")
        if key in FLAG_OF:
            raise UsageError(f"--slurm_args {key} is set by compare.py's {FLAG_OF[key]}; use that")
        if key in SET_BY_SUBMITIT:
            raise UsageError(f"--slurm_args {key} is set by compare.py itself, for the job logs and the time limit's "
                             f"warning; leave it out")
        options[key] = value
    return options


def new_executor(folder):
    """The executor that submits the jobs and finds them again: SLURM's (the tests stand submitit's local one in)."""
    import submitit

    return submitit.SlurmExecutor(folder)


def read_record(folder):
    """{run name: {"job": its job id, "expected": the run's settings, "submitted": time.time() then}}."""
    path = Path(folder) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def job_state(job):
    """A submitit job's state as SLURM names it (RUNNING, PENDING, COMPLETED, ...; FINISHED for a local job)."""
    return (job.state or "UNKNOWN").split()[0].upper()  # "CANCELLED by 123" is CANCELLED


def waiting_runs(runs, launcher):
    """The names of the runs whose job, submitted by an earlier call, is still queued or running with the same
    settings: compare.py waits for it instead of submitting it again. A job still going with other settings is
    refused: another job on its run directory would clash with it."""
    record = read_record(launcher.folder)
    listed = [r for r in runs if r.name in record]
    if not listed:
        return set()
    job_class = new_executor(launcher.folder).job_class
    jobs = {r.name: job_class(folder=launcher.folder.absolute(), job_id=record[r.name]["job"]) for r in listed}
    waiting = set()
    for r in listed:  # the first state asked for updates them all at once
        job_id, state = record[r.name]["job"], job_state(jobs[r.name])
        if state not in LIVE:
            continue
        if value_differences(record[r.name]["expected"], json.loads(json.dumps(r.expected))):
            raise UsageError(f"job {job_id} ({state.lower()}) trains {r.out_dir} with other settings; wait for it "
                             f"to end or cancel it with scancel {job_id}")
        waiting.add(r.name)
    return waiting


def train_as_jobs(runs, states, command, launcher, stream=None):
    """Submit each run that is not in state "submitted" (see waiting_runs) as a job, all in one array where there are
    several, then wait for every run's job, showing one status line each; command(run, state) is the training
    script's command line.

    Returns the exit code of a stop by SIGINT or SIGTERM (0 when none), which leaves the jobs to SLURM, and the exit
    code of each failed run.
    """
    if not runs:
        return 0, {}
    stream = stream or sys.stdout
    executor = new_executor(launcher.folder)
    executor.update_parameters(**launcher.parameters)
    with SignalsReceived() as received:  # a Ctrl-C during the submission stops the waiting after it
        submitted = submit(executor, [r for r in runs if states[r.name] != "submitted"], states, command, launcher)
        record = read_record(launcher.folder)
        jobs = []
        for r in runs:
            entry = record[r.name]
            if r.name in submitted:
                job, word = submitted[r.name], "submitted as"
            else:  # by an earlier call
                job, word = executor.job_class(folder=executor.folder, job_id=entry["job"]), "waiting for"
            print(f"{r.name}: {word} job {entry['job']}, training in {r.out_dir}", file=stream)
            jobs.append(ClusterJob(r.name, command(r, states[r.name]), r.out_dir, r.expected["settings"]["max_iters"],
                                   started=entry["submitted"], submitted=job))
        wait(jobs, received, stream)
    if received.signals:
        going = [job.submitted.job_id for job in jobs if job.state in WAITING]
        cancel = f"; to cancel them: scancel {' '.join(going)}" if going else ""
        print(f"{signal.Signals(received.signals[0]).name}: compare.py stops waiting and leaves the jobs to SLURM; "
              f"the same command gathers them when they end{cancel}", file=sys.stderr)
        return 128 + received.signals[0], {}
    return 0, {job.name: job.exit_code or 1 for job in jobs if job.state == "failed"}  # 1: ended without a code


def submit(executor, runs, states, command, launcher):
    """Submit a job for each run (an array of them where there are several) and add them to the record;
    {run name: its submitit job}."""
    from submitit.core.utils import FailedSubmissionError, UncompletedJobError

    if not runs:
        return {}
    cwd = os.getcwd()
    folder = Path(executor.folder).absolute()
    created = first_missing(folder)
    before = set() if created else set(folder.iterdir())
    try:
        with contextlib.redirect_stderr(io.StringIO()), executor.batch():  # submitit prints a refusal whole
            submitted = [executor.submit(run_training, command(r, states[r.name]), cwd, str(r.out_dir / "train.log"),
                                         states[r.name] == "resume", launcher.threads)
                         for r in runs]
    except (UncompletedJobError, FailedSubmissionError) as e:  # sbatch refused them, or answered unreadably
        for path in [created] if created else set(folder.iterdir()) - before:  # submitit's files for the jobs
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        raise UsageError(f"the jobs could not be submitted: {one_line(e)}; check --slurm_partition, --slurm_time "
                         f"and --slurm_args") from None
    record, now = read_record(launcher.folder), time.time()
    for r, job in zip(runs, submitted):
        record[r.name] = {"job": job.job_id, "expected": r.expected, "submitted": now}
    atomic_write_text(launcher.folder / RECORD, json.dumps(record, indent=1) + "\n")
    return {r.name: job for r, job in zip(runs, submitted)}


def wait(jobs, received, stream):
    """Follow the jobs until every one has ended or a signal came, one status line each."""
    board = StatusBoard(jobs, stream)
    asked = time.time()
    going = jobs
    while going and not received.signals:
        if time.time() - asked > STATE_S:
            going[0].submitted.get_info(mode="force")  # asks SLURM for the states of all the jobs
            asked = time.time()
        for job in going:
            follow(job, board)
        board.refresh()
        going = [job for job in going if job.state in WAITING]
        if going:
            time.sleep(POLL_S)
    board.refresh(final=True)


def follow(job, board):
    """Bring job up to date from submitit and its metrics.csv; print its failure when it has failed."""
    from submitit.core.utils import UncompletedJobError

    submitted = job.submitted
    job.last_row = latest_metrics(job) or job.last_row
    if not submitted.done():
        job.state = "training" if job_state(submitted) in RUNNING else "queued"
        return
    job.ended = time.time()
    try:
        job.exit_code = submitted.result()
    except UncompletedJobError:  # ended without a result: cancelled, out of time or memory, its node lost
        job.state, job.job_log = "failed", submitted.paths.stdout
        board.message(f"error: {job.name} failed: job {submitted.job_id} ended {job_state(submitted)} without a "
                      f"result (its log: {job.job_log})", sys.stderr)
        return
    job.state = "done" if job.exit_code == 0 else "failed"
    if job.state == "failed":
        board.message(failure_message(job), sys.stderr)

