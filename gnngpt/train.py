"""The training loop shared by the three scripts: AdamW, evaluation, metrics, checkpoints, stop and resume."""
import functools
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .checkpoint import save_checkpoint
from .errors import CaughtSignals, UsageError, one_line
from .rundir import MetricsLog

LOG_INTERVAL = 10  # steps between the progress bar's loss and speed, besides those of evaluations and stops


def autocast(device, dtype):
    """bf16 autocast of the forward pass when dtype is "bfloat16"; a context that does nothing otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


@torch.no_grad()
def evaluate(model, sampler, eval_iters, dtype="float32", stop=None, splits=("train", "val")):
    """Mean loss over eval_iters random batches of each split, with the model in eval mode.

    stop (a StopSignals) is looked at before each batch: once it has caught a signal, the evaluation ends there
    and returns None.
    """
    was_training = model.training
    model.eval()
    out = {}
    try:
        for split in splits:
            losses = torch.empty(eval_iters)
            for k in range(eval_iters):
                if stop is not None and stop.signum:
                    return None
                with autocast(sampler.device, dtype):
                    _, loss = model(*sampler.get(split))
                losses[k] = loss.item()
            out[split] = losses.mean().item()
    finally:
        model.train(was_training)
    return out


def make_optimizer(model, learning_rate):
    """AdamW over the model's parameters, fused: one update for all tensors instead of one per tensor."""
    return torch.optim.AdamW(model.parameters(), lr=learning_rate, fused=True)


def train(model, sampler, settings, out_dir, checkpoint_meta, resume_from, tracking, after_evaluation):
    """Train with AdamW up to settings["max_iters"] steps; evaluate, log and checkpoint every eval_interval.

    Evaluations happen at step 0, every eval_interval steps and after the last step; each appends a row to
    metrics.csv and rewrites ckpt.pt: checkpoint_meta, the model, the optimizer, the step, the random states of
    every rank, the metrics so far; then tracking (a tracking.Tracking) logs the row, and after_evaluation(step)
    runs (on every rank; its time counts as the evaluation's, not the training's), and again on resuming from that
    step. resume_from (such a checkpoint, or None for a new run) continues its run exactly. SIGINT or SIGTERM stops
    after the current step, or within one batch of an evaluation, with a checkpoint of the last finished step, and
    raises Interrupted (an evaluation stopped so runs whole on resuming); a non-finite loss raises UsageError and
    keeps the last checkpoint. Under torchrun the model trains in DistributedDataParallel; rank 0 alone evaluates
    and writes files. Returns the metrics rows.
    """
    return Trainer(model, sampler, settings, out_dir, checkpoint_meta, resume_from, tracking, after_evaluation).run()


class Trainer:
    """One training run's state: the model and optimizer, the step, the metrics, the clock, the last checkpoint."""

    def __init__(self, model, sampler, settings, out_dir, checkpoint_meta, resume_from, tracking, after_evaluation):
        self.model, self.sampler, self.settings, self.meta = model, sampler, settings, checkpoint_meta
        self.after_evaluation, self.tracking = after_evaluation, tracking
        self.ckpt_path = Path(out_dir) / "ckpt.pt"
        self.dtype = settings.get("dtype", "float32")
        self.tokens_per_step = settings["batch_size"] * settings["block_size"] * distributed.world_size()
        self.main = distributed.is_main_process()
        self.optimizer = make_optimizer(model, settings["learning_rate"])
        self.step, self.rows, self.elapsed_before, self.train_s, self.saved_step = 0, [], 0.0, 0.0, None
        if resume_from is not None:
            self.step, self.rows, self.elapsed_before, self.train_s = restore(resume_from, model, self.optimizer,
                                                                              sampler)
            self.saved_step = self.step
        self.metrics = MetricsLog(Path(out_dir) / "metrics.csv", self.rows) if self.main else None
        self.train_model = distributed.wrap(model)
        self.start = self.interval_start = time.perf_counter()
        self.interval_steps = 0
        self.unchecked = []  # losses of the steps not yet checked for NaN and infinity
        self.bar = self.stop = None

    def run(self):
        """Train to max_iters: evaluate first (step 0, or a resumed step whose evaluation a signal stopped), then
        step, report, evaluate and stop on a signal."""
        max_iters = self.settings["max_iters"]
        self.model.train()
        with StopSignals(second_aborts=not distributed.launched_by_torchrun()) as self.stop, \
                tqdm(initial=self.step, total=max_iters, desc="training", unit="step", dynamic_ncols=True,
                     disable=not self.main) as self.bar:
            if self.eval_due() and (not self.rows or self.rows[-1]["step"] < self.step):
                self.evaluate_and_save()
            elif self.rows:  # resumed after the evaluation of its step: what came after it may have been cut short
                self.after_evaluation(self.step)
            self.interval_start = time.perf_counter()  # the training seconds start with the first step
            while self.step < max_iters:
                self.train_step()
                eval_due = self.eval_due()
                signum = distributed.max_over_ranks(self.stop.signum or 0)  # every rank stops after the same step
                if eval_due or signum or self.step % LOG_INTERVAL == 0:
                    self.report_progress()
                if eval_due:
                    self.evaluate_and_save()
                if signum and self.step < max_iters:  # after a step that evaluated, evaluate_and_save has stopped
                    if self.saved_step != self.step:
                        self.save(time.perf_counter() - self.interval_start)
                    raise Interrupted(signum, after_step(self.step, self.ckpt_path))
        return self.rows

    def eval_due(self):
        """Whether the current step is one to evaluate: step 0, every eval_interval steps and the last."""
        return self.step % self.settings["eval_interval"] == 0 or self.step == self.settings["max_iters"]

    def train_step(self):
        with autocast(self.sampler.device, self.dtype):
            _, loss = self.train_model(*self.sampler.get("train"))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.unchecked.append(loss.detach())
        self.step += 1
        self.interval_steps += 1
        self.bar.update(1)

    def report_progress(self):
        """Check the losses since the last report (one device sync) and show the last one and the speed."""
        last_loss = check_finite(self.unchecked, self.step, self.ckpt_path, self.saved_step)
        self.unchecked = []
        rate = self.interval_steps * self.tokens_per_step / (time.perf_counter() - self.interval_start)
        self.bar.set_postfix(loss=f"{last_loss:.4f}", tok_per_s=f"{rate:,.0f}")

    def evaluate_and_save(self):
        """Evaluate on rank 0, append the metrics row, checkpoint, log the row to the trackers, and restart the
        speed measurement. A signal during the evaluation stops it within a batch: the checkpoint of this step
        then holds the random states from before it, so that resuming runs the same evaluation, and Interrupted
        is raised."""
        synchronize(self.sampler.device)
        train_time = time.perf_counter() - self.interval_start
        self.train_s += train_time if self.interval_steps else 0.0  # the time before the first step is no training
        before = rng_state(self.sampler)
        losses = distributed.from_main(  # a partial, not a closure over the model: see distributed.teardown
            functools.partial(evaluate, self.model, self.sampler, self.settings["eval_iters"], self.dtype, self.stop))
        if losses is None:
            set_rng_state(before, self.sampler)
            self.save()
            raise Interrupted(distributed.from_main(lambda: self.stop.signum), after_step(self.step, self.ckpt_path))
        if not all(map(math.isfinite, losses.values())):
            raise UsageError(f"the evaluation loss is not finite at step {self.step} ({losses}); "
                             f"{kept_checkpoint(self.ckpt_path, self.saved_step)}")
        row = {
            "step": self.step,
            "train_loss": round(losses["train"], 4),
            "val_loss": round(losses["val"], 4),
            "elapsed_s": round(self.elapsed(), 2),
            "tokens_per_s": round(self.interval_steps * self.tokens_per_step / train_time, 1)
            if self.interval_steps else "",
            "train_s": round(self.train_s, 4),
            "tokens": self.step * self.tokens_per_step,
        }
        self.rows.append(row)
        if self.main:
            self.metrics.append(row)
            self.bar.write(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        self.save()
        # logged once checkpointed: a resumed run, which logs from its checkpoint's step on, logs no step twice
        self.tracking.log(row, self.optimizer.param_groups[0]["lr"])
        self.after_evaluation(self.step)  # outside the training seconds, as the evaluation
        self.interval_start, self.interval_steps = time.perf_counter(), 0

    def save(self, unrecorded_train_s=0.0):
        """Checkpoint the current step, with unrecorded_train_s seconds of training since the last evaluation;
        every rank hands over its random states, rank 0 writes."""
        rng = distributed.gather(rng_state(self.sampler))
        if self.main:
            save_checkpoint(self.ckpt_path, {
                **self.meta,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "step": self.step,
                "rng": rng,
                "metrics": self.rows,
                "elapsed_s": self.elapsed(),
                "train_s": self.train_s + unrecorded_train_s,
            })
        self.saved_step = self.step

    def elapsed(self):
        """Seconds of training so far, those before a resume included."""
        return self.elapsed_before + time.perf_counter() - self.start


class Interrupted(Exception):
    """A run stopped by SIGINT or SIGTERM with a checkpoint to resume from; when says when and where that is."""

    def __init__(self, signum, when):
        super().__init__(f"stopped by {signal.Signals(signum).name} {when}")
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM, as a shell reports them


def after_step(step, checkpoint_path):
    return f"after step {step}; checkpoint written to {checkpoint_path}"


class StopSignals(CaughtSignals):
    """While active, SIGINT and SIGTERM ask training to stop after the current step, and an evaluation (see
    evaluate) before its next batch: signum is set.

    A second signal then acts as usual (Ctrl-C raises KeyboardInterrupt, SIGTERM ends the process), except
    under torchrun, which forwards a Ctrl-C to workers that have already seen it.
    """

    def __init__(self, second_aborts=True):
        self.second_aborts = second_aborts
        self.signum = None

    def handle(self, signum, frame):
        if self.signum is None and distributed.is_main_process():
            again = ("; press Ctrl-C again to stop at once, keeping the checkpoint of the last evaluation"
                     if self.second_aborts else "")
            print(f"\n{signal.Signals(signum).name}: stopping after this step, or within this evaluation, with a "
                  f"checkpoint{again}", file=sys.stderr)
        self.signum = self.signum or signum
        if self.second_aborts:
            self.restore()


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
    if saved_step is None:  # the evaluation before the first step; the run leaves no file (see rundir.hold_run_dir)
        return ("the untrained model gives it, so no learning rate helps; train again with other model settings "
                "(such as --dtype)")
    return (f"training stopped and {ckpt_path} keeps the last good state (step {saved_step}); train again with "
            f"--overwrite and a lower --learning_rate")


def rng_state(sampler):
    """The random states this process draws from: torch's CPU, CUDA and MPS generators and the batch sampler's."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "mps": torch.mps.get_rng_state() if sampler.device.type == "mps" else None,
        "sampler": sampler.generator.get_state(),
    }


def set_rng_state(state, sampler=None):
    """Set the random states of this process to state (an rng_state): torch's, and the batch sampler's where one is
    given."""
    torch.set_rng_state(state["cpu"])
    for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(cuda_state, device)
    if state.get("mps") is not None and torch.backends.mps.is_available():  # not where a Mac's run is read elsewhere
        torch.mps.set_rng_state(state["mps"])
    if sampler is not None:
        sampler.generator.set_state(state["sampler"])


def restore(checkpoint, model, optimizer, sampler):
    """Load the model, the optimizer and this rank's random states; returns (step, metrics rows, elapsed_s,
    train_s). A checkpoint from before train_s was kept gives its elapsed_s, evaluations included, instead."""
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_state(checkpoint["rng"][distributed.rank()], sampler)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UsageError(f"the checkpoint does not fit this run ({one_line(e)[:120]}); "
                         f"start again with --overwrite") from None
    elapsed_s = checkpoint["elapsed_s"]
    return checkpoint["step"], list(checkpoint["metrics"]), elapsed_s, checkpoint.get("train_s", elapsed_s)


def synchronize(device):
    """Wait for queued CUDA or MPS work so that wall-clock timings are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
