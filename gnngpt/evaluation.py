"""The exact validation loss: every character of a split predicted once, from consecutive windows, in eval mode."""
import csv
import json
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from .data import DEFAULT_DATA, BatchSampler, CharTokenizer, encode_known, halves, load_text, split, text_digest
from .errors import UsageError, one_line
from .files import atomic_writes, utf8, write_failure
from .rundir import eval_files
from .train import evaluate

HALVES = ("tune", "test")  # the validation split's halves, in order: data.halves


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
def losses_by_offset(model, data, block_size, batch_size, device, progress=True, part="val"):
    """The summed cross-entropy of the targets at each offset t = 0 .. block_size - 1 of the windows of `windows`
    (the target at offset t is predicted from the t + 1 characters of its window up to offset t, the character
    at offset t itself included), and how many there are.

    The windows go through the model batch_size at a time, in eval mode (no dropout) and in float32 whatever the
    training's dtype, as in training. Returns (sums, counts): (block_size,) tensors, float64 and int64, on the CPU.
    """
    if len(data) < 2:
        raise UsageError(f"the text to evaluate has {len(data)} character(s); it needs at least two")
    was_training = model.training
    model.eval()
    device = torch.device(device)
    (x, y), tail = windows(data, block_size)
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    batches += [tail] if tail is not None else []
    sums = torch.zeros(block_size, dtype=torch.float64)  # summed on the CPU in double precision (MPS has no float64)
    counts = torch.zeros(block_size, dtype=torch.long)
    for xb, yb in tqdm(batches, desc=f"exact evaluation ({part})", unit="batch", disable=not progress, leave=False):
        xb, yb = xb.to(device), yb.to(device)
        logits, _ = model(xb)
        losses = F.cross_entropy(logits.transpose(1, 2), yb, reduction="none")  # (B, t)
        sums[:yb.size(1)] += losses.sum(0).cpu().double()
        counts[:yb.size(1)] += yb.size(0)
    model.train(was_training)
    return sums, counts


def mean_loss(total, targets):
    """{"nats", "bits", "targets"}: the mean of a summed cross-entropy over its targets, in nats and in bits."""
    nats = total / targets
    return {"nats": nats, "bits": nats / math.log(2), "targets": targets}


def exact_loss(model, data, block_size, batch_size, device, progress=True, part="val"):
    """The mean cross-entropy over every target of data (a 1-D tensor of token ids), in nats and in bits, from the
    windows of `windows` (see losses_by_offset). Returns {"nats", "bits", "targets"}."""
    sums, counts = losses_by_offset(model, data, block_size, batch_size, device, progress, part)
    return mean_loss(sums.sum().item(), int(counts.sum()))


def exact_evaluation(model, data, settings, device, batch_size=None, with_halves=True):
    """The exact loss of data (a run's validation split) at the run's block_size and batch_size (unless given),
    with its loss at each offset of the windows and, with_halves, the exact loss of each half of data windowed on
    its own (data.halves: "tune" chooses settings, "test" reports them).

    Returns exact_loss's keys for the whole of data, "by_position" ({"loss": [...], "targets": [...]} per offset
    t = 0, 1, ...), "tune" and "test" (each as exact_loss returns; with_halves only, and only where data has 4 tokens
    or more, so that each half has a target), and its seconds as eval_s.
    """
    start = time.perf_counter()
    block_size, batch_size = settings["block_size"], batch_size or settings["batch_size"]
    sums, counts = losses_by_offset(model, data, block_size, batch_size, device)
    result = mean_loss(sums.sum().item(), int(counts.sum()))
    seen = counts > 0  # every offset, unless data is shorter than one window
    result["by_position"] = {"loss": (sums[seen] / counts[seen]).tolist(), "targets": counts[seen].tolist()}
    if with_halves and len(data) >= 4:  # each half has a target (a validation split of 3 or fewer has none)
        for part, half in zip(HALVES, halves(data)):
            result[part] = exact_loss(model, half, block_size, batch_size, device, part=f"{part} half")
    return {**result, "eval_s": round(time.perf_counter() - start, 2)}


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
    data = encode_known(CharTokenizer(vocab), text, path,
                        "evaluate a text made only of characters of the training text")
    if len(text) < 2:
        raise UsageError(f"{path} has one character, and the evaluation predicts each character after the first; "
                         f"give a --data of two or more")
    return data


def run_validation_split(config, vocab, instead):
    """The validation split of the text a run was trained on (its config's data), with its vocabulary; instead:
    what the errors for a text that is missing or is not the run's offer besides finding that text."""
    path = Path(config["data"])
    if path != Path(DEFAULT_DATA) and not path.is_file():
        raise UsageError(f"the run's training text {path} is not here; run from the directory it was trained in, "
                         f"or {instead}")
    text = load_text(None if path == Path(DEFAULT_DATA) else path,
                     instead=f"put the run's training text, tinyshakespeare, in {path}")
    if config.get("data_sha256") not in (None, text_digest(text)):  # (runs from before it was recorded have none)
        raise UsageError(f"{path} is not the text the run was trained on (by the data_sha256 of its config.json); "
                         f"restore that text, or {instead}")
    return validation_split(text, vocab)


def in_batches(batch_size):
    """How an evaluation goes, as its memory errors say: "in batches of N windows", or "one window at a time"."""
    return f"in batches of {batch_size} windows" if batch_size > 1 else "one window at a time"


def batch_advice(batch_size, smaller):
    """What to do where an evaluation in batches of batch_size does not fit in memory: smaller (how to evaluate in
    smaller batches), unless they hold one window already."""
    return smaller if batch_size > 1 else "a single window does not fit either: free memory on the device"


def write_eval(out_dir, result, step, at=None):
    """Write a run's exact evaluation at step (exact_evaluation's result, of its validation split): the loss at
    each position to loss_by_position.csv, then eval.json, the losses of the whole split and of its halves in
    nats and bits per character; at=step writes them as the snapshot of an earlier step (rundir.eval_files)."""
    eval_path, position_path = eval_files(out_dir, at)
    by_position = result["by_position"]
    rows = "".join(f"{t},{loss:.6f},{n}\n" for t, (loss, n) in enumerate(zip(by_position["loss"],
                                                                          by_position["targets"])))
    record = {"step": step, "val_loss": round(result["nats"], 6), "val_bpc": round(result["bits"], 6),
              "targets": result["targets"]}
    for part in (part for part in HALVES if part in result):
        record.update({f"{part}_loss": round(result[part]["nats"], 6), f"{part}_bpc": round(result[part]["bits"], 6),
                       f"{part}_targets": result[part]["targets"]})
    try:  # both or neither: losses by position beside an eval.json of another evaluation would mislead
        atomic_writes([(position_path, utf8("offset,loss,targets\n" + rows)),
                       (eval_path, utf8(json.dumps({**record, "eval_s": result["eval_s"]}, indent=2) + "\n"))])
    except OSError as e:
        raise UsageError(write_failure(e.target, e)) from None


EVAL_KEYS = ("step", "val_loss", "val_bpc", "targets")  # what every eval.json holds, halves or not


def read_eval(out_dir, step=None, at=None):
    """A run's eval.json (at: its snapshot of that step) as a dict, or None when it is missing, unreadable or (with
    step) of another step."""
    return read_eval_or_why(out_dir, step, at)[0]


def read_eval_or_why(out_dir, step=None, at=None):
    """read_eval's dict and "", or None and why: "no eval.json", "eval.json cannot be read (...)" or "eval.json is
    of step N, not step"."""
    path = eval_files(out_dir, at)[0]
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"no {path.name}"
    except (OSError, ValueError) as e:
        return None, f"{path.name} cannot be read ({one_line(e)})"
    if not isinstance(record, dict):
        return None, f"{path.name} cannot be read (not a JSON object)"
    if missing := [key for key in EVAL_KEYS if key not in record]:
        return None, f"{path.name} cannot be read (no {', '.join(missing)})"
    if not all(type(record[key]) is int for key in ("step", "targets")):  # not a bool, which is an int to Python
        return None, f"{path.name} cannot be read (its step or targets is no whole number)"
    if step is not None and record["step"] != step:
        return None, f"{path.name} is of step {record['step']}, not {step}"
    return record, ""


def has_snapshot(out_dir, step):
    """Whether the run in out_dir has a readable snapshot of step (--exact_at), as read_eval reads it."""
    return read_eval(out_dir, step, at=step) is not None


def has_halves(record):
    """Whether an eval.json record holds the losses of the validation split's halves (runs from before it did not)."""
    return record is not None and all(f"{part}_loss" in record for part in HALVES)


def read_loss_by_position(out_dir, at=None):
    """A run's loss_by_position.csv (at: its snapshot of that step) as {"loss": [...], "targets": [...]} per offset,
    or None when it is missing or unreadable."""
    try:
        with open(eval_files(out_dir, at)[1], newline="") as f:
            rows = list(csv.DictReader(f))
        return {"loss": [float(r["loss"]) for r in rows], "targets": [int(r["targets"]) for r in rows]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe(result):
    """One line for a person: the exact loss in nats and bits per character, over how many characters."""
    return (f"exact validation loss {result['nats']:.4f} nats, {result['bits']:.4f} bits per character "
            f"({result['targets']:,} character{'s' if result['targets'] > 1 else ''})")


def describe_evaluation(result):
    """describe(result), then the halves' losses where there are any, and the loss at a few positions."""
    text = describe(result)
    if all(part in result for part in HALVES):
        text += "; " + ", ".join(f"{part} half {result[part]['nats']:.4f}" for part in HALVES)
    return f"{text}; {describe_positions(result['by_position'])}"


def describe_positions(by_position):
    """The loss at offsets 1, 8, 32 and the last (those the windows have), as "by position 1: 2.4051, ..."."""
    last = len(by_position["loss"]) - 1
    offsets = sorted({t for t in (1, 8, 32) if t < last} | {last})
    return "by position " + ", ".join(f"{t}: {by_position['loss'][t]:.4f}" for t in offsets)
