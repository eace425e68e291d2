"""Training runs in child processes, up to N at once, each shown by one live status line (compare.py --jobs N)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RUNS_AT_ONCE
from .errors import CaughtSignals, UsageError, one_line
from .processes import start_logged
from .results import format_duration, format_rate
from .rundir import read_metrics

POLL_S = 0.5  # how often the children are checked, signals passed on and the status refreshed


@dataclass
class Job:
    """One training run as a child process: its command and run directory, and how it is going."""

    name: str
    command: list
    out_dir: Path
    max_iters: int
    resume: bool = False  # train.log continues the stopped run's output instead of starting afresh
    device: str = "cpu"  # "cuda": a GPU of its own when this process sees several
    state: str = "queued"  # then "training", and "done", "failed", "stopped" or "not started"
    process: subprocess.Popen = None
    exit_code: int = None
    gpu: str = None
    started: float = None  # time.time() at the start: metrics.csv older than that is a previous run's
    ended: float = None
    signals_sent: int = 0
    last_row: dict = None  # the latest row of its metrics.csv

    @property
    def log_path(self):
        return Path(self.out_dir) / "train.log"


def run_jobs(jobs, at_once, planned=None, stream=None):
    """Run every job, at most at_once at a time, showing their status; the exit code of a stop, or 0.

    Each child gets its share of the CPU cores (see child_threads) among min(at_once, planned) trainings, planned
    being how many runs the whole comparison has (len(jobs) by default): a comparison run again after a stop, with
    fewer runs left, trains each on as many threads as before, its resumed ones included. Each child also gets its
    own GPU where this process sees several, and a session of its own: a Ctrl-C at the terminal reaches it only
    through here. SIGINT or SIGTERM here goes to every running child, once per signal received, and no queued job
    starts; the result is then 128 + the first signal's number. A failure is printed with its log's last line.
    """
    stream = stream or sys.stdout
    gpus = visible_gpus() if any(job.device == "cuda" for job in jobs) else []
    together = min(at_once, planned or len(jobs))
    threads = child_threads(together)
    if any(job.device == "cpu" for job in jobs) and together * threads > cpu_cores():
        why = (f"OMP_NUM_THREADS={threads} gives each training {threads} thread{'s' if threads > 1 else ''}"
               if os.environ.get("OMP_NUM_THREADS") else "each training needs a thread of its own")
        print(f"note: {why}; {together} at once on {cpu_cores()} CPU cores wait for each other: --jobs "
              f"{max(1, cpu_cores() // threads)} would share them", file=stream)
    board = StatusBoard(jobs, stream)
    with SignalsReceived() as received, StoppedOnError(jobs):
        noted = 0
        while True:
            signals = received.signals[:]  # those that arrive from here on are seen in the next round
            if len(signals) > noted:
                board.message(stop_message(signals), sys.stderr)
                noted = len(signals)
            for job in jobs:
                if job.state == "training":
                    pass_on(signals, job)
                    check(job, signals, board)
            running = [job for job in jobs if job.state == "training"]
            queued = [job for job in jobs if job.state == "queued"]
            if not signals:
                for job in queued[:at_once - len(running)]:
                    start(job, least_loaded(gpus, running), threads, together)
                    running.append(job)
            if not running and (signals or not queued):
                break
            board.refresh()
            time.sleep(POLL_S)
    for job in jobs:
        if job.state == "queued":
            job.state = "not started"
    board.refresh(final=True)
    return 128 + signals[0] if signals else 0


def cpu_cores():
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def child_threads(together):
    """The torch threads of each of `together` trainings at once: the value of OMP_NUM_THREADS where it is set,
    else an equal share of the cores (cores // together, at least 1), so that they do not wait for each other."""
    explicit = os.environ.get("OMP_NUM_THREADS", "")
    return int(explicit) if explicit.isdigit() and int(explicit) > 0 else max(1, cpu_cores() // together)


def start(job, gpu, threads, together):
    """Start job's command on threads torch threads with its output in its train.log (appended to when
    resuming), telling it that up to `together` trainings run at once (its config.json records runs_at_once)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", RUNS_AT_ONCE: str(together)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    job.process = start_logged(job.command, job.log_path, job.resume, env=env, start_new_session=True)
    job.state, job.gpu, job.started = "training", gpu, time.time()


def pass_on(signals, job):
    """Send job's child the signals received since the last call."""
    for signum in signals[job.signals_sent:]:
        job.process.send_signal(signum)
    job.signals_sent = len(signals)


def check(job, signals, board):
    """Read job's latest metrics; when its child has ended, record how, and print a failure."""
    code = job.process.poll()
    job.last_row = latest_metrics(job) or job.last_row  # read after the poll: an ended child has written its last
    if code is None:
        return
    job.exit_code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it
    job.ended = time.time()
    if code == 0:
        job.state = "done"
    elif signals and job.exit_code > 128:
        job.state = "stopped"
    else:
        job.state = "failed"
        board.message(failure_message(job), sys.stderr)


def failure_message(job):
    """The error line of a job that failed with an exit code: the last line of its log, the code, the log's path."""
    return (f"error: {job.name} failed: {last_line(job.log_path)} (exit code {job.exit_code}; its output is in "
            f"{job.log_path})")


def latest_metrics(job):
    """The last row of job's metrics.csv when this run has written one, else None."""
    path = Path(job.out_dir) / "metrics.csv"
    try:
        if path.stat().st_mtime < job.started:
            return None
        rows = read_metrics(job.out_dir)
    except (OSError, UsageError):  # not written yet, or caught halfway through a row
        return None
    return rows[-1] if rows else None


def last_line(path):
    """The last non-empty line of a log (progress bars' carriage returns split lines too), without "error: "; what
    stopped it being read where it cannot be (its run directory removed meanwhile, say)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as e:
        return f"its log cannot be read ({e.strerror or one_line(e)})"
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1].removeprefix("error: ") if lines else "no output"


def stop_message(signals):
    name = signal.Signals(signals[-1]).name
    if len(signals) == 1:
        return (f"\n{name}: every run stops after its current step with a checkpoint; press Ctrl-C again to stop "
                f"them at once")
    return f"\n{name}: passed on to the runs still going"


def visible_gpus():
    """The CUDA_VISIBLE_DEVICES value of each GPU this process sees when it sees several, else []."""
    count = torch.cuda.device_count()
    if count < 2:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [g.strip() for g in visible.split(",")][:count] if visible else [str(i) for i in range(count)]


def least_loaded(gpus, running):
    """The GPU of gpus that the fewest running jobs use (the first of those on a tie), or None without gpus."""
    return min(gpus, key=lambda gpu: sum(job.gpu == gpu for job in running)) if gpus else None


def status_line(job, name_width):
    """model, state, last evaluation (step, validation loss, training speed), time, GPU."""
    parts = [job.name.ljust(name_width), job.state.ljust(11)]
    row = job.last_row
    if row:
        parts += [f"step {int(row['step'])}/{job.max_iters}", f"val loss {row['val_loss']:.4f}",
                  f"{format_rate(row['tokens_per_s'])} tokens/s"]
    if job.started is not None:
        parts.append(format_duration((job.ended or time.time()) - job.started))
    if job.gpu is not None:
        parts.append(f"GPU {job.gpu}")
    if job.state in ("failed", "stopped"):
        parts.append(f"{'' if job.exit_code is None else f'exit code {job.exit_code}, '}log {job.log_path}")
    return "  ".join(parts).rstrip()


class StatusBoard:
    """One status line per job: redrawn in place on a terminal; elsewhere (a log) printed when it changes."""

    def __init__(self, jobs, stream):
        self.jobs, self.stream = jobs, stream
        self.live = stream.isatty()
        self.name_width = max((len(job.name) for job in jobs), default=0)
        self.drawn = 0  # lines of the board now on the terminal, below which the cursor stands
        self.printed = {}

    def refresh(self, final=False):
        if self.live:
            self.erase()
            columns = shutil.get_terminal_size().columns - 1  # a wrapped line would break the redrawing
            lines = [status_line(job, self.name_width)[:columns] for job in self.jobs]
            self.stream.write("".join(f"{line}\n" for line in lines))
            self.drawn = 0 if final else len(lines)
        else:
            for job in self.jobs:
                key = (job.state, job.last_row and job.last_row["step"])
                if self.printed.get(job.name) != key:
                    self.printed[job.name] = key
                    self.stream.write(f"{status_line(job, self.name_width)}\n")
        self.stream.flush()

    def erase(self):
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")  # up to the board's first line, clear to the end
            self.drawn = 0

    def message(self, text, file):
        """Print text above the board (the next refresh draws it again below)."""
        self.erase()
        self.stream.flush()
        print(text, file=file, flush=True)


class SignalsReceived(CaughtSignals):
    """While active, SIGINT and SIGTERM are only recorded, in order, in .signals: run_jobs acts on them."""

    def __enter__(self):
        self.signals = []
        return super().__enter__()

    def handle(self, signum, frame):
        self.signals.append(signum)


class StoppedOnError:
    """When the block raises, its running jobs get SIGTERM (a checkpoint after their step) and are waited for:
    in sessions of their own, they would otherwise outlive this process."""

    def __init__(self, jobs):
        self.jobs = jobs

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        running = [job for job in self.jobs if job.state == "training"] if exc_type else []
        for job in running:
            job.process.terminate()
        for job in running:
            job.process.wait()
