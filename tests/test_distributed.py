import csv
import importlib.util
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import offline_wandb_env, tensorboard_scalars, train_tiny_gpt, wandb_runs
from gnngpt import distributed, train
from gnngpt.checkpoint import load_checkpoint
from gnngpt.data import BatchSampler, CharTokenizer, split
from gnngpt.models import build_model
from gnngpt.train import Trainer, evaluate

ROOT = Path(__file__).resolve().parents[1]
BETA1 = 0.9  # AdamW's default: after one step its first moment is (1 - beta1) * gradient
WEIGHT_DECAY, EPS = 0.01, 1e-8  # AdamW's defaults, which the training keeps
# with wandb and tensorboard installed (as CI has them), the run is tracked too: by rank 0 alone
TRACKERS = ["--wandb_log", "--tensorboard"] if all(map(importlib.util.find_spec, ("wandb", "tensorboard"))) else []


def launch(cwd, script, *args, options=(), env=None):
    """script run in two processes under torchrun (its options first), in cwd, to the end."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *options, str(script), *args], cwd=cwd,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def torchrun(cwd, data, out_dir, *args, options=(), env=None):
    """A tiny gpt.py training of two gloo processes under torchrun (its options first), run in cwd to the end."""
    launch(cwd, ROOT / "gpt.py", "--data", str(data), "--out_dir", out_dir, "--device", "cpu", "--eval_interval", "1",
           "--eval_iters", "2", "--batch_size", "3", "--block_size", "8", "--n_embd", "16", "--n_head", "2",
           "--n_layer", "1", "--learning_rate", "1e-2", *args, options=options, env=env)


# Every rank, as the training scripts do: join, train a step in DistributedDataParallel, gather (as a checkpoint
# does), leave. A group that outlived teardown would keep its worker threads running while Python shuts down,
# freeing the last collective's tensors, which aborts the process now and then; it must be gone at teardown.
TEARDOWN = """
import weakref
import torch
from gnngpt import distributed

def train_a_step():
    distributed.setup(torch.device("cpu"))
    model = distributed.wrap(torch.nn.Linear(2, 2))
    model(torch.ones(1, 2)).sum().backward()
    distributed.gather(distributed.rank())
    return weakref.ref(torch.distributed.group.WORLD)

group = train_a_step()
distributed.teardown()
assert group() is None, "the process group outlived teardown"
"""


def test_the_process_group_is_freed_at_teardown_so_no_worker_thread_outlives_it(tmp_path):
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN)
    python_path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    launch(tmp_path, script, env={"PYTHONPATH": python_path})


@pytest.fixture
def one_process_group(monkeypatch):
    """distributed.setup joins a gloo group of this process alone: the training runs in DistributedDataParallel,
    in process. Yields the list that holds a weak reference to each group it made."""
    groups = []

    def setup(device):
        importlib.import_module("torch.distributed.nn.functional")  # first, as distributed.setup imports it
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        groups.append(weakref.ref(dist.group.WORLD))
        return device

    monkeypatch.setattr(distributed, "setup", setup)
    yield groups
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("where", ["step", "evaluation"])
def test_a_bug_that_ends_the_training_leaves_no_process_group_behind(where, one_process_group, tiny_text_file,
                                                                      tmp_path, monkeypatch):
    owner, name = {"step": (Trainer, "train_step"), "evaluation": (train, "evaluate")}[where]
    real, calls = getattr(owner, name), []

    def bug_at_the_second_call(*args, **kwargs):  # after a step in DistributedDataParallel
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("a bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, bug_at_the_second_call)
    with pytest.raises(RuntimeError, match="a bug") as raised:
        train_tiny_gpt(tmp_path / "out", tiny_text_file, "--max_iters", "4", "--eval_interval", "1")
    assert raised.traceback[-1].name == "bug_at_the_second_call"  # the traceback still reaches where it raised
    (group,) = one_process_group
    assert group() is None, "the bug's traceback keeps the process group alive past teardown"


def test_two_gloo_processes_under_torchrun_train_like_one_process_on_the_global_batch(tiny_text_file, tmp_path):
    torchrun(tmp_path, tiny_text_file, "out", "--max_iters", "1", "--dropout", "0", *TRACKERS,
             options=["--log-dir", "logs", "--redirects", "3"], env=offline_wandb_env(tmp_path / "wandb-home"))

    # rank 0 alone prints, evaluates, writes the run files and tracks: one W&B run, one TensorBoard event file
    stdout = {rank: next(tmp_path.glob(f"logs/*/attempt_0/{rank}/stdout.log")).read_text() for rank in (0, 1)}
    assert stdout[1] == ""
    assert stdout[0].count("step 0: train loss") == 1 and stdout[0].count("step 1: train loss") == 1
    out = tmp_path / "out"
    tracked = [p.name for p in out.iterdir() if p.name == "wandb" or p.name.startswith("events.out.tfevents.")]
    assert len(tracked) == len(TRACKERS)
    assert sorted({p.name for p in out.iterdir()} - set(tracked)) == \
        [".lock", "ckpt.pt", "config.json", "eval.json", "loss_by_position.csv", "metrics.csv", "sample.txt"]
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["step"], row["tokens"]) for row in rows] == [("0", "0"), ("1", str(2 * 3 * 8))]  # both ranks' batches
    if TRACKERS:
        (wandb_run,) = wandb_runs(out)
        assert list(wandb_run["history"]) == [0, 1]
        assert [step for step, _ in tensorboard_scalars(out)["val/loss"]] == [0, 1]
    assert not (tmp_path / "model_outputs").exists()
    ckpt = load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["config"]["processes"] == 2 and len(ckpt["rng"]) == 2

    # the same step in one process: rank 0's model, rank 0's batch (drawn after its step-0 evaluation)
    # and rank 1's batch (its own seed) together
    seed = ckpt["config"]["seed"]
    text = tiny_text_file.read_text()
    tokenizer = CharTokenizer.from_text(text)
    train_data, val_data = split(torch.tensor(tokenizer.encode(text), dtype=torch.long))
    samplers = [BatchSampler(train_data, val_data, 8, 3, "cpu", seed + rank) for rank in (0, 1)]
    torch.manual_seed(seed)
    model = build_model("gpt", ckpt["model_config"])
    evaluate(model, samplers[0], eval_iters=2)
    x, y = (torch.cat(t) for t in zip(*(s.get("train") for s in samplers)))  # (2B, T) each
    _, loss = model(x, y)
    loss.backward()

    moments = ckpt["optimizer"]["state"]
    lr = ckpt["config"]["settings"]["learning_rate"]
    for i, (name, p) in enumerate(model.named_parameters()):
        torch.testing.assert_close(moments[i]["exp_avg"] / (1 - BETA1), p.grad, rtol=0, atol=1e-5, msg=name)
        # AdamW's first step: decay by lr * weight decay, then a step of lr against m/sqrt(v), bias-corrected
        stepped = p.detach() * (1 - lr * WEIGHT_DECAY) - lr * p.grad / (p.grad.abs() + EPS)
        torch.testing.assert_close(ckpt["model"][name], stepped, rtol=0, atol=lr * 1e-2, msg=name)


def test_two_processes_stopped_and_resumed_under_torchrun_train_as_if_never_stopped(tiny_text_file, tmp_path):
    torchrun(tmp_path, tiny_text_file, "whole", "--max_iters", "2")
    torchrun(tmp_path, tiny_text_file, "parts", "--max_iters", "1")
    # resumed, each rank's batches go on from its own random state
    torchrun(tmp_path, tiny_text_file, "parts", "--max_iters", "2", "--resume")
    whole, parts = (load_checkpoint(tmp_path / name / "ckpt.pt") for name in ("whole", "parts"))
    assert parts["step"] == whole["step"] == 2
    for name, weight in whole["model"].items():
        assert torch.equal(parts["model"][name], weight), name
    losses = {name: [(row["step"], row["train_loss"], row["val_loss"])
                     for row in csv.DictReader((tmp_path / name / "metrics.csv").open(newline=""))]
              for name in ("whole", "parts")}
    assert losses["parts"] == losses["whole"] and len(losses["whole"]) == 3  # steps 0, 1 and 2
