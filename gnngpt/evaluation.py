"""The exact validation loss: every character of a split predicted once, from consecutive windows, in eval mode."""
import json
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from .data import DEFAULT_DATA, BatchSampler, CharTokenizer, load_text, split
from .errors import UsageError
from .files import atomic_write_text
from .rundir import EVAL_FILE
from .train import evaluate


def windows(data, block_size):
    """The (x, y) windows that make every token of data after the first a target exactly once.

    x = data[i : i+T], y = data[i+1 : i+T+1] for i = 0, T, 2T, ... (T = block_size); the tail, fewer than T
    targets, as one shorter window. Returns the full windows as (N, T) tensors and the tail as (1, r) tensors
    (None when the targets divide evenly).
    """
    targets = len(data) - 1
    full = targets // block_size * block_size
    x = data[:full].view(-1, block_size)
    y = data[1:full + 1].view(-1, block_size)
    tail = (data[full:-1][None], data[full + 1:][None]) if full < targets else None
    return (x, y), tail


@torch.no_grad()
def exact_loss(model, data, block_size, batch_size, device, progress=True):
    """The mean cross-entropy over every target of data (a 1-D tensor of token ids), in nats and in bits.

    The windows of `windows` go through the model batch_size at a time, in eval mode (no dropout) and in float32
    whatever the training's dtype; each target is predicted from the earlier tokens of its window, as in
    training. Returns {"nats", "bits", "targets"}.
    """
    if len(data) < 2:
        raise UsageError(f"the text to evaluate has {len(data)} character(s); it needs at least two")
    was_training = model.training
    model.eval()
    device = torch.device(device)
    (x, y), tail = windows(data, block_size)
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    batches += [tail] if tail is not None else []
    total = 0.0  # summed in Python's double precision (MPS has no float64)
    for xb, yb in tqdm(batches, desc="exact evaluation", unit="batch", disable=not progress, leave=False):
        xb, yb = xb.to(device), yb.to(device)
        logits, _ = model(xb)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), yb.reshape(-1), reduction="sum").item()
    model.train(was_training)
    targets = len(data) - 1
    nats = total / targets
    return {"nats": nats, "bits": nats / math.log(2), "targets": targets}


def random_estimates(model, data, settings, device, repeats):
    """The random-batch estimate of training's evaluations (settings' eval_iters batches of batch_size windows
    drawn from data), repeats times with seeds 0, 1, ...: how far one such estimate falls from the exact loss."""
    estimates = []
    for seed in tqdm(range(repeats), desc="random-batch estimates", unit="estimate", leave=False):
        sampler = BatchSampler(data, data, settings["block_size"], settings["batch_size"], device, seed)
        estimates.append(evaluate(model, sampler, settings["eval_iters"], splits=("val",))["val"])
    return estimates


def validation_split(text, vocab):
    """The validation tokens of a run's training text, encoded with the run's vocabulary (its checkpoint's)."""
    tokenizer = CharTokenizer.from_text(text)
    if tokenizer.chars != list(vocab):
        raise UsageError("the run's training text has changed: its characters are not the run's vocabulary; put the "
                         "text it was trained on back, or evaluate another file with --data FILE")
    return split(torch.tensor(tokenizer.encode(text), dtype=torch.long))[1]


def encode_whole(text, vocab, path):
    """All of text as token ids of vocab; UsageError naming the characters outside it."""
    tokenizer = CharTokenizer(vocab)
    unknown = tokenizer.unknown(text)
    if unknown:
        raise UsageError(f"{path} has characters outside the model's vocabulary: {' '.join(map(repr, unknown))}; "
                         f"evaluate a text made only of characters of the training text")
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def timed_exact_loss(model, data, settings, device, batch_size=None):
    """exact_loss at a run's block_size and batch_size (unless given), with its seconds as eval_s."""
    start = time.perf_counter()
    result = exact_loss(model, data, settings["block_size"], batch_size or settings["batch_size"], device)
    return {**result, "eval_s": round(time.perf_counter() - start, 2)}


def run_validation_split(config, vocab):
    """The validation split of the text a run was trained on (its config's data), with its vocabulary."""
    path = Path(config["data"])
    if path != Path(DEFAULT_DATA) and not path.is_file():
        raise UsageError(f"the run's training text {path} is not here; run from the directory it was trained in, "
                         f"or evaluate another file with --data FILE")
    return validation_split(load_text(None if path == Path(DEFAULT_DATA) else path), vocab)


def write_eval(out_dir, result, step):
    """Write eval.json: the exact validation loss (nats, bits per character) of the run's checkpoint at step."""
    record = {"step": step, "val_loss": round(result["nats"], 6), "val_bpc": round(result["bits"], 6),
              "targets": result["targets"], "eval_s": result["eval_s"]}
    atomic_write_text(Path(out_dir) / EVAL_FILE, json.dumps(record, indent=2) + "\n")


def read_eval(out_dir, step=None):
    """A run's eval.json as a dict, or None when it is missing, unreadable or (with step) of another step."""
    try:
        record = json.loads((Path(out_dir) / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or (step is not None and record.get("step") != step):
        return None
    return record


def describe(result):
    """One line for a person: the exact loss in nats and bits per character, over how many characters."""
    return (f"exact validation loss {result['nats']:.4f} nats, {result['bits']:.4f} bits per character "
            f"({result['targets']:,} characters)")
