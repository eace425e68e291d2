"""A training as a process of its own with its output in a log: started by compare.py --jobs N, or inside each
SLURM job of compare.py --launcher slurm by run_training. The standard library only: a SLURM job imports this
module, and nothing heavier, before its training starts."""
import os
import shlex
import signal
import subprocess
from pathlib import Path


def start_logged(command, log_path, append, **popen_args):
    """Start command with its output in log_path (appended to, or a new file), after a line with the command."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a" if append else "w") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **popen_args)


def run_training(command, cwd, log, resume, threads):
    """What each SLURM job runs: the training command in cwd, its output in log (continued when resuming), with
    OMP_NUM_THREADS=threads when given; its exit code.

    SLURM's warning before the time limit (submitit asks for SIGUSR2) reaches the training as SIGTERM, on which it
    stops after its current step with a checkpoint; the training itself ignores SIGUSR2, should SLURM send it to
    every process of the job.
    """
    os.chdir(cwd)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # inherited by the training: ignored there
    process = start_logged(command, log, resume, env=env)
    signal.signal(signal.SIGUSR2, lambda signum, frame: process.terminate())
    return process.wait()
