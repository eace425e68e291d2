"""Checkpoints written atomically and read back without unpickling code."""
import os
import tempfile
from pathlib import Path

import torch


def atomic_write(path, write):
    """Call write(file) on a temporary file beside path, fsync it, then rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda f: torch.save(checkpoint, f))
