"""Experiment tracking: W&B (offline) and TensorBoard read back equal metrics.csv; off by default, and then unused."""
import ast
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_GPT_RUN, tensorboard_scalars, train_tiny_gpt, wandb_runs
from gnngpt.checkpoint import load_checkpoint
from gnngpt.data import BatchSampler
from gnngpt.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
EVERY_2 = ["--eval_interval", "2"]
TINY = [*EVERY_2, *TINY_GPT_RUN]
METRICS = {"train/loss": "train_loss", "val/loss": "val_loss", "tokens_per_s": "tokens_per_s"}  # tag: column


pytestmark = pytest.mark.usefixtures("in_tmp_path")


def train(out, data, *args):
    return train_tiny_gpt(out, data, *EVERY_2, *args)


def test_wandb_offline_run_logs_the_metrics_at_their_steps_and_resume_continues_it(offline_wandb, tiny_text_file,
                                                                                   tmp_path):
    out = tmp_path / "run"
    assert train(out, tiny_text_file, "--max_iters", "4", "--wandb_log") == 0
    assert train(out, tiny_text_file, "--max_iters", "8", "--wandb_log", "--wandb_run_name", "longer",
                 "--resume") == 0

    first, resumed = wandb_runs(out)
    checkpoint = load_checkpoint(out / "ckpt.pt")
    assert first["id"] == resumed["id"] == checkpoint["wandb_run_id"]
    assert (first["project"], first["name"], resumed["name"]) == ("gpt_gat", "gpt", "longer")
    assert first["config"]["settings"] == {**checkpoint["config"]["settings"], "max_iters": 4}
    assert resumed["config"]["model_config"] == checkpoint["model_config"]
    assert list(first["history"]) == [0, 2, 4] and list(resumed["history"]) == [6, 8]  # no step twice

    logged = {**first["history"], **resumed["history"]}
    learning_rate = checkpoint["config"]["settings"]["learning_rate"]
    for row in read_metrics(out):
        expected = {tag: row[column] for tag, column in METRICS.items() if row[column] is not None}
        assert logged[row["step"]] == {**expected, "lr": learning_rate}
    assert {"ckpt.pt", "sample.txt"} <= first["files"] and {"ckpt.pt", "sample.txt"} <= resumed["files"]
    assert first["exit_code"] == resumed["exit_code"] == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_wandb_run_stopped_by_a_signal_ends_with_the_trainings_exit_code(signum, offline_wandb, tiny_text_file,
                                                                          tmp_path, monkeypatch):
    real_get = BatchSampler.get
    calls = []

    def signal_at_the_third_batch(sampler, split):
        calls.append(split)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)
        return real_get(sampler, split)

    monkeypatch.setattr(BatchSampler, "get", signal_at_the_third_batch)
    assert train(tmp_path / "run", tiny_text_file, "--max_iters", "8", "--wandb_log") == 128 + signum
    (run,) = wandb_runs(tmp_path / "run")
    assert run["exit_code"] == 128 + signum  # W&B marks it stopped, not finished


def test_a_wandb_run_that_fails_before_its_first_checkpoint_leaves_the_out_dir_as_it_found_it(
        offline_wandb, tiny_text_file, tmp_path, monkeypatch):
    def interrupted(sampler, split):  # in the evaluation before the first step, after wandb.init wrote its folder
        raise KeyboardInterrupt

    monkeypatch.setattr(BatchSampler, "get", interrupted)
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "runs" / "new", tmp_path / "kept"):  # directories it made, and one that was there
        before = sorted(p for p in tmp_path.rglob("*") if "wandb-home" not in p.parts)
        assert train(out, tiny_text_file, "--max_iters", "2", "--wandb_log") == 130
        assert sorted(p for p in tmp_path.rglob("*") if "wandb-home" not in p.parts) == before


def assert_tensorboard_equals_metrics(out):
    rows = read_metrics(out)
    scalars = tensorboard_scalars(out)
    learning_rate = load_checkpoint(out / "ckpt.pt")["config"]["settings"]["learning_rate"]
    assert scalars.pop("lr") == [(row["step"], np.float32(learning_rate)) for row in rows]
    assert scalars == {tag: [(row["step"], np.float32(row[column])) for row in rows if row[column] is not None]
                       for tag, column in METRICS.items()}


def test_tensorboard_event_files_equal_metrics_csv_through_resume_and_overwrite(tiny_text_file, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert train(out, tiny_text_file, "--max_iters", "4", "--tensorboard") == 0
    assert train(out, tiny_text_file, "--max_iters", "6", "--tensorboard", "--resume") == 0
    assert [row["step"] for row in read_metrics(out)] == [0, 2, 4, 6]
    assert_tensorboard_equals_metrics(out)

    assert train(out, tiny_text_file, "--max_iters", "2", "--tensorboard", "--seed", "7", "--overwrite") == 0
    assert [row["step"] for row in read_metrics(out)] == [0, 2]
    assert_tensorboard_equals_metrics(out)  # the replaced run's events are gone


UNTRACKED = """
import socket, sys
attempts = []
def refuse(*args, **kwargs):
    attempts.append(repr(args)[:80])
    raise OSError("no network in this test")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = socket.getaddrinfo = refuse
from gnngpt.cli import main
from gnngpt.config import GPT
code = main(GPT, sys.argv[1:])
trackers = sorted(m for m in sys.modules if m.split(".")[0] in ("wandb", "tensorboard") or "tensorboard" in m)
print(repr((code, trackers, attempts)))
"""


def test_without_a_tracker_flag_neither_package_is_imported_and_no_network_is_used(tiny_text_file, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", UNTRACKED, "--data", str(tiny_text_file), "--out_dir", "out",
                             *TINY, "--max_iters", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ast.literal_eval(result.stdout.splitlines()[-1]) == (0, [], [])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        [".lock", "ckpt.pt", "config.json", "eval.json", "loss_by_position.csv", "metrics.csv", "sample.txt"]


@pytest.mark.parametrize("flag,package", [("--wandb_log", "wandb"), ("--tensorboard", "tensorboard")])
def test_a_tracker_whose_package_is_missing_ends_before_anything_is_written(flag, package, tiny_text_file, tmp_path,
                                                                            monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # what an import finds when the package is not installed
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)  # imported again, it needs it
    before = sorted(tmp_path.rglob("*"))
    assert train(tmp_path / "run", tiny_text_file, "--max_iters", "2", flag) == 2
    assert capsys.readouterr().err == (f"error: {flag} needs the {package} package, which cannot be imported "
                                       f"(import of {package} halted; None in sys.modules); install it with "
                                       f"pip install {package}, or drop {flag}\n")
    assert sorted(tmp_path.rglob("*")) == before


def test_a_project_name_that_w_and_b_refuses_is_named_before_any_login(tiny_text_file, tmp_path, capsys):
    pytest.importorskip("wandb")
    before = sorted(tmp_path.rglob("*"))
    assert train(tmp_path / "run", tiny_text_file, "--max_iters", "2", "--wandb_log", "--wandb_project", "me/it") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --wandb_project 'me/it' is not a name W&B takes (Invalid project name 'me/it': ")
    assert err.endswith("); choose another\n") and err.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_a_failed_wandb_init_leaves_the_out_dir_as_it_found_it(tiny_text_file, tmp_path, monkeypatch, capsys):
    def init(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Settings=dict))
    (tmp_path / "kept").mkdir()
    before = sorted(tmp_path.rglob("*"))
    for out in (tmp_path / "runs" / "new", tmp_path / "kept"):  # directories it made, and one that was there
        assert train(out, tiny_text_file, "--max_iters", "2", "--wandb_log") == 2
        assert capsys.readouterr().err == ("error: wandb.init failed (api_key not configured (no-tty)); log in with "
                                           "wandb login, set WANDB_MODE=offline, or drop --wandb_log\n")
        assert sorted(tmp_path.rglob("*")) == before
