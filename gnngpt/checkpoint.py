"""Checkpoints written atomically and read back without unpickling code."""
import os
import tempfile
from pathlib import Path

import pickle
import zipfile

import torch

from .errors import UsageError


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


def load_checkpoint(path):
    """A checkpoint dict read with weights_only=True (no code runs), onto the CPU; UsageError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}; train a model first or point --out_dir at a finished run")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{path} is not a readable checkpoint of this project ({reason[:120]})") from None
    if not isinstance(checkpoint, dict) or not {"arch", "model_config", "model", "vocab"} <= set(checkpoint):
        raise UsageError(f"{path} is not a checkpoint of this project; train one with pyg-gpt.py, gpt.py or bigram.py")
    return checkpoint
