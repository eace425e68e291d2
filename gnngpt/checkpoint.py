"""Checkpoints written atomically and read back without unpickling code."""
import pickle
import zipfile
from pathlib import Path

import torch

from .errors import UsageError, one_line
from .files import atomic_write, write_fix
from .models import ARCHITECTURES


def save_checkpoint(path, checkpoint):
    """Write a checkpoint dict atomically; UsageError (the previous checkpoint kept) when the disk refuses. Without a
    previous checkpoint, a training leaves no run (see rundir.hold_run_dir): the message says to train again."""
    previous = Path(path).exists()
    try:
        atomic_write(path, lambda f: torch.save(checkpoint, f))
    except OSError as e:
        go_on = "the previous checkpoint is unchanged; " if previous else ""
        raise UsageError(f"could not write {path} ({e.strerror or e}); {go_on}{write_fix(e)} or choose another "
                         f"--out_dir, then {'--resume' if previous else 'train again'}") from None


def load_checkpoint(path):
    """A checkpoint dict read with weights_only=True (no code runs), onto the CPU; UsageError if unreadable.

    The zip archive's CRC-32 checksums are verified first, so a truncated or corrupted file is refused
    before any of it is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}; train a model first or point --out_dir at a finished run")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise UsageError(f"{path} is corrupt (checksum mismatch in {damaged}); use another checkpoint or retrain")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, KeyError, OSError) as e:
        raise UsageError(f"{path} is not a readable checkpoint of this project ({one_line(e)[:120]}); train it "
                         f"again or point --out_dir at another run") from None
    if not is_project_checkpoint(checkpoint):
        raise UsageError(f"{path} is not a checkpoint of this project; train one with pyg-gpt.py, gpt.py or bigram.py")
    return checkpoint


def readable_checkpoint(path):
    """Whether load_checkpoint reads path."""
    try:
        load_checkpoint(path)
    except UsageError:
        return False
    return True


def is_project_checkpoint(checkpoint):
    """Whether a loaded object has the fields of this project's checkpoints, with consistent types."""
    fields = {"name", "step", "arch", "model_config", "model", "vocab"}
    if not isinstance(checkpoint, dict) or not fields <= set(checkpoint):
        return False
    model, config, vocab = checkpoint["model"], checkpoint["model_config"], checkpoint["vocab"]
    return (
        checkpoint["arch"] in ARCHITECTURES
        and type(checkpoint["step"]) is int and checkpoint["step"] >= 0
        and isinstance(config, dict)
        and isinstance(model, dict)
        and all(isinstance(t, torch.Tensor) for t in model.values())
        and isinstance(vocab, list)
        and all(isinstance(ch, str) for ch in vocab)
        and config.get("vocab_size") == len(vocab)
    )
