"""The training loop shared by the three scripts: AdamW, evaluation, metrics, checkpoints, stop and resume."""
import csv
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .checkpoint import atomic_write, load_checkpoint, save_checkpoint
from .errors import UsageError, one_line

METRICS_FIELDS = ("step", "train_loss", "val_loss", "elapsed_s", "tokens_per_s")
RUN_FILES = ("config.json", "metrics.csv", "ckpt.pt")
# What a resumed run may change: how long it trains, whether it is compiled, the graph layers' backend.
RESUMABLE_CHANGES = {"max_iters", "compile", "backend"}
TRAINING_STATE = {"optimizer", "step", "rng", "metrics", "elapsed_s", "config"}


def autocast(device, dtype):
    """bf16 autocast of the forward pass when dtype is "bfloat16"; a context that does nothing otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


@torch.no_grad()
def evaluate(model, sampler, eval_iters, dtype="float32"):
    """Mean loss over eval_iters random batches of each split, with the model in eval mode."""
    was_training = model.training
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses = torch.empty(eval_iters)
        for k in range(eval_iters):
            with autocast(sampler.device, dtype):
                _, loss = model(*sampler.get(split))
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train(was_training)
    return out


class MetricsLog:
    """metrics.csv in the run directory, one row per evaluation, flushed as it is written."""

    def __init__(self, path, rows=()):
        """Start the file with the header and rows (those of the checkpoint when resuming)."""
        self.path = Path(path)
        with self.path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(METRICS_FIELDS)
            writer.writerows([row[k] for k in METRICS_FIELDS] for row in rows)

    def append(self, row):
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in METRICS_FIELDS])


class Interrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after writing a checkpoint."""

    def __init__(self, signum, step, checkpoint_path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                         f"checkpoint written to {checkpoint_path}")
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them


class StopSignals:
    """While active, SIGINT and SIGTERM ask training to stop after the current step (signum is set).

    A second signal then acts as usual (Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process), except
    under torchrun, which forwards a Ctrl-C to workers that have already seen it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, second_aborts=True):
        self.second_aborts = second_aborts
        self.signum = None

    def __enter__(self):
        # a signal ignored by the parent (such as SIGINT for a background job of a script) stays ignored
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
        for s in self.previous:
            signal.signal(s, self.request)
        return self

    def request(self, signum, frame):
        if self.signum is None and distributed.is_main_process():
            again = "; press Ctrl-C again to stop at once, without a checkpoint" if self.second_aborts else ""
            print(f"\n{signal.Signals(signum).name}: stopping after this step{again}", file=sys.stderr)
        self.signum = self.signum or signum
        if self.second_aborts:
            self.restore()

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __exit__(self, *exc):
        self.restore()


def make_optimizer(model, learning_rate):
    """AdamW over the model's parameters, with the fused kernel: one update for all tensors instead of one per tensor."""
    return torch.optim.AdamW(model.parameters(), lr=learning_rate, fused=True)


def train(model, sampler, settings, out_dir, checkpoint_meta, resume_from=None, log_interval=10):
    """Train with AdamW up to settings["max_iters"] steps; evaluate, log and checkpoint every eval_interval.

    Evaluations happen at step 0, every eval_interval steps and after the last step; each appends a row to
    metrics.csv and rewrites ckpt.pt: checkpoint_meta, the model, the optimizer, the step, the random states
    of every rank, the metrics so far. resume_from (such a checkpoint) continues its run exactly. SIGINT or
    SIGTERM stops after the current step with a checkpoint and raises Interrupted; a non-finite loss raises
    UsageError and keeps the last checkpoint. Under torchrun the model trains in DistributedDataParallel;
    rank 0 alone evaluates and writes files. Returns the metrics rows.
    """
    ckpt_path = Path(out_dir) / "ckpt.pt"
    max_iters, eval_interval = settings["max_iters"], settings["eval_interval"]
    dtype = settings.get("dtype", "float32")
    tokens_per_step = settings["batch_size"] * settings["block_size"] * distributed.world_size()
    main = distributed.is_main_process()
    optimizer = make_optimizer(model, settings["learning_rate"])
    step, rows, elapsed_before, saved_step = 0, [], 0.0, None
    if resume_from is not None:
        step, rows, elapsed_before = restore(resume_from, model, optimizer, sampler)
        saved_step = step
    metrics = MetricsLog(Path(out_dir) / "metrics.csv", rows) if main else None
    train_model = distributed.wrap(model)
    start = interval_start = time.perf_counter()
    interval_steps, unchecked = 0, []  # losses of the steps not yet checked for NaN and infinity

    def save(step):
        """Checkpoint after step steps; every rank hands over its random states, rank 0 writes."""
        nonlocal saved_step
        rng = distributed.gather(rng_state(sampler))
        if main:
            save_checkpoint(ckpt_path, {
                **checkpoint_meta,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "rng": rng,
                "metrics": rows,
                "elapsed_s": elapsed_before + time.perf_counter() - start,
            })
        saved_step = step

    def evaluate_and_save(step):
        nonlocal interval_start, interval_steps
        synchronize(sampler.device)
        train_time = time.perf_counter() - interval_start
        losses = distributed.from_main(lambda: evaluate(model, sampler, settings["eval_iters"], dtype))
        if not all(map(math.isfinite, losses.values())):
            raise UsageError(f"the evaluation loss is not finite at step {step} ({losses}); "
                             f"{kept_checkpoint(ckpt_path, saved_step)}")
        row = {
            "step": step,
            "train_loss": round(losses["train"], 4),
            "val_loss": round(losses["val"], 4),
            "elapsed_s": round(elapsed_before + time.perf_counter() - start, 2),
            "tokens_per_s": round(interval_steps * tokens_per_step / train_time, 1) if interval_steps else "",
        }
        rows.append(row)
        if main:
            metrics.append(row)
            bar.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        save(step)
        interval_start, interval_steps = time.perf_counter(), 0

    model.train()
    with StopSignals(second_aborts=not distributed.launched_by_torchrun()) as stop, \
            tqdm(initial=step, total=max_iters, desc="training", unit="step", dynamic_ncols=True,
                 disable=not main) as bar:
        if resume_from is None:
            evaluate_and_save(0)
        while step < max_iters:
            with autocast(sampler.device, dtype):
                _, loss = train_model(*sampler.get("train"))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            unchecked.append(loss.detach())
            step += 1
            interval_steps += 1
            bar.update(1)
            eval_due = step % eval_interval == 0 or step == max_iters
            signum = distributed.max_over_ranks(stop.signum or 0)  # every rank stops after the same step
            if eval_due or signum or step % log_interval == 0:
                last_loss = check_finite(unchecked, step, ckpt_path, saved_step)  # one device sync
                unchecked = []
                rate = interval_steps * tokens_per_step / (time.perf_counter() - interval_start)
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_per_s=f"{rate:,.0f}")
            if eval_due:
                evaluate_and_save(step)
            if signum and step < max_iters:  # a signal during the last step lets the finished run end normally
                if saved_step != step:
                    save(step)
                raise Interrupted(signum, step, ckpt_path)
    return rows


def check_finite(losses, step, ckpt_path, saved_step):
    """The last of the training losses of the steps before step; UsageError naming the first non-finite one."""
    values = torch.stack(losses).tolist()
    first_step = step - len(values)
    local_bad = next((first_step + i for i, v in enumerate(values) if not math.isfinite(v)), step)
    bad = distributed.min_over_ranks(local_bad)
    if bad < step:
        raise UsageError(f"the training loss is not finite at step {bad}; {kept_checkpoint(ckpt_path, saved_step)}")
    return values[-1]


def kept_checkpoint(ckpt_path, saved_step):
    kept = "no checkpoint was written" if saved_step is None else \
        f"{ckpt_path} keeps the last good state (step {saved_step})"
    return f"training stopped and {kept}; try a lower --learning_rate"


def rng_state(sampler):
    """The random states this process draws from: torch's CPU and CUDA generators and the batch sampler's."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "sampler": sampler.generator.get_state(),
    }


def restore(checkpoint, model, optimizer, sampler):
    """Load the model, the optimizer and this rank's random states; returns (step, metrics rows, elapsed_s)."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        state = checkpoint["rng"][distributed.rank()]
        torch.set_rng_state(state["cpu"])
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
        sampler.generator.set_state(state["sampler"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UsageError(f"the checkpoint does not fit this run ({one_line(e)[:120]}); "
                         f"start again with --overwrite") from None
    return checkpoint["step"], list(checkpoint["metrics"]), checkpoint["elapsed_s"]


def open_run_dir(out_dir, config, vocab, resume=False, overwrite=False):
    """Check out_dir, then write config.json there; returns the checkpoint to resume from, or None.

    Without resume or overwrite, a directory that holds a run (finished, unfinished or of another
    configuration) is refused. With resume, ckpt.pt must continue the run that config and vocab describe.
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other; pass one of them")
    checkpoint = None
    if resume:
        checkpoint = resumable_checkpoint(out_dir, config, vocab)
    elif not overwrite and holds_run(out_dir):
        raise UsageError(f"{out_dir} {describe_run(out_dir, config)}")
    distributed.barrier()  # every rank has looked at out_dir before rank 0 changes it
    if distributed.is_main_process():
        if overwrite:
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
        atomic_write(out_dir / "config.json", lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))
    return checkpoint


def holds_run(out_dir):
    """Whether out_dir holds any file of a run (config.json, metrics.csv or ckpt.pt)."""
    return any((Path(out_dir) / name).exists() for name in RUN_FILES)


def describe_run(out_dir, config):
    """What the run in out_dir is and how to go on, for a refusal to replace it."""
    old = read_config(out_dir)
    if is_finished(out_dir, old):
        return ("holds a finished run; pass --overwrite to replace it, --resume with a larger --max_iters to "
                "train it further, or choose another --out_dir")
    if old is None:
        return "holds files of a run without a readable config.json; pass --overwrite to replace them or choose another --out_dir"
    differences = config_differences(old, config)
    if differences:
        return (f"holds a run of another configuration ({'; '.join(differences)}); pass --overwrite to "
                f"replace it or choose another --out_dir")
    return ("holds an unfinished run of this configuration; pass --resume to continue it, --overwrite to "
            "start again, or choose another --out_dir")


def resumable_checkpoint(out_dir, config, vocab):
    """The checkpoint in out_dir after checking that it continues the run described by config and vocab."""
    path = out_dir / "ckpt.pt"
    if not path.is_file():
        raise UsageError(f"nothing to resume: no checkpoint at {path}; drop --resume to start a new run")
    checkpoint = load_checkpoint(path)
    missing = TRAINING_STATE - set(checkpoint)
    if missing:
        raise UsageError(f"{path} holds no training state to resume (no {', '.join(sorted(missing))}); "
                         f"start again with --overwrite")
    if checkpoint["vocab"] != list(vocab):
        raise UsageError(f"cannot resume {path}: its vocabulary ({len(checkpoint['vocab'])} characters) is not "
                         f"the one of --data ({len(vocab)} characters); pass the --data of the original run")
    differences = config_differences(checkpoint["config"], config)
    if differences:
        raise UsageError(f"cannot resume {path}: {'; '.join(differences)}; pass the flags of the original run "
                         f"or start again with --overwrite")
    processes = len(checkpoint["rng"])
    if processes != distributed.world_size():
        raise UsageError(f"cannot resume {path}: it was trained by {processes} process(es), this run has "
                         f"{distributed.world_size()}; resume it with {processes} process(es) in all")
    if checkpoint["step"] >= config["settings"]["max_iters"]:
        raise UsageError(f"the run in {out_dir} finished at step {checkpoint['step']}; pass a --max_iters above "
                         f"{checkpoint['step']} to train it further")
    return checkpoint


def config_differences(old, new):
    """'key was X, now Y' for each setting of the model and training that differs between two run configs."""
    def comparable(config):
        fields = {"name": config.get("name"), "seed": config.get("seed"),
                  **config.get("model_config", {}), **config.get("settings", {})}
        return {k: v for k, v in fields.items() if k not in RESUMABLE_CHANGES}

    old, new = comparable(old), comparable(new)
    return [f"{k} was {old.get(k)}, now {new.get(k)}" for k in {**old, **new} if old.get(k) != new.get(k)]


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


def read_config(out_dir):
    """A run's config.json as a dict, or None when it is missing or unreadable."""
    try:
        config = json.loads((Path(out_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_finished(out_dir, config):
    """Whether the run in out_dir, of config (its read_config), evaluated after its last step: its metrics
    reach settings max_iters."""
    rows = read_metrics(out_dir)
    if not rows or config is None:
        return False
    return rows[-1]["step"] == config.get("settings", {}).get("max_iters")
