"""The training loop shared by the three scripts: AdamW, periodic evaluation, metrics and checkpoints."""
import csv
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import save_checkpoint

METRICS_FIELDS = ("step", "train_loss", "val_loss", "elapsed_s", "tokens_per_s")


@torch.no_grad()
def evaluate(model, sampler, eval_iters):
    """Mean loss over eval_iters random batches of each split, with the model in eval mode."""
    was_training = model.training
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses = torch.empty(eval_iters)
        for k in range(eval_iters):
            _, loss = model(*sampler.get(split))
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train(was_training)
    return out


class MetricsLog:
    """metrics.csv in the run directory, one row per evaluation, flushed as it is written."""

    def __init__(self, path):
        self.path = Path(path)
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerow(METRICS_FIELDS)

    def append(self, row):
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in METRICS_FIELDS])


def train(model, sampler, settings, out_dir, checkpoint_meta, log_interval=10):
    """Train with AdamW for settings["max_iters"] steps; evaluate, log and checkpoint every eval_interval.

    Evaluations happen at step 0, every eval_interval steps and after the last step. checkpoint_meta is
    stored in every ckpt.pt beside the model, the optimizer and the step. Returns the metrics rows.
    """
    out_dir = Path(out_dir)
    max_iters, eval_interval = settings["max_iters"], settings["eval_interval"]
    tokens_per_step = settings["batch_size"] * settings["block_size"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"])
    metrics = MetricsLog(out_dir / "metrics.csv")
    rows = []
    start = interval_start = time.perf_counter()
    interval_steps = 0
    model.train()
    with tqdm(total=max_iters, desc="training", unit="step", dynamic_ncols=True) as bar:
        for step in range(max_iters + 1):
            if step % eval_interval == 0 or step == max_iters:
                synchronize(sampler.device)
                train_time = time.perf_counter() - interval_start
                losses = evaluate(model, sampler, settings["eval_iters"])
                row = {
                    "step": step,
                    "train_loss": round(losses["train"], 4),
                    "val_loss": round(losses["val"], 4),
                    "elapsed_s": round(time.perf_counter() - start, 2),
                    "tokens_per_s": round(interval_steps * tokens_per_step / train_time, 1) if interval_steps else "",
                }
                rows.append(row)
                metrics.append(row)
                bar.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                save_checkpoint(out_dir / "ckpt.pt", {
                    **checkpoint_meta,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                })
                interval_start, interval_steps = time.perf_counter(), 0
            if step == max_iters:
                break
            _, loss = model(*sampler.get("train"))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            interval_steps += 1
            bar.update(1)
            if step % log_interval == 0:
                loss_value = loss.item()  # synchronises the device, so only every log_interval steps
                rate = interval_steps * tokens_per_step / (time.perf_counter() - interval_start)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_per_s=f"{rate:,.0f}")
    return rows


def synchronize(device):
    """Wait for queued CUDA work so that wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_metrics(out_dir):
    """The rows of a run's metrics.csv as dicts of numbers ([] when there is none)."""
    path = Path(out_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(f)]


def is_finished(out_dir):
    """Whether the run in out_dir evaluated after its last step (its metrics reach settings max_iters)."""
    config_path = Path(out_dir) / "config.json"
    rows = read_metrics(out_dir)
    if not rows or not config_path.is_file():
        return False
    return rows[-1]["step"] == json.loads(config_path.read_text())["settings"]["max_iters"]
