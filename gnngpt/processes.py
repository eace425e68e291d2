"""A training as a process of its own with its output in a log (compare.py --jobs N). The standard library only."""
import shlex
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

