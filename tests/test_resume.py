import contextlib
import csv
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import sample
from conftest import (
    ALLOCATION_ERROR,
    CACHE_ERROR,
    MULTINOMIAL_ERROR,
    allocation_fails,
    failing_cache,
    failing_multinomial,
)
from gnngpt import cli, rundir
from gnngpt.checkpoint import load_checkpoint, save_checkpoint
from gnngpt.cli import main
from gnngpt.config import GPT as GPT_SCRIPT, PYG_GPT, RUNS_AT_ONCE
from gnngpt.data import BatchSampler
from gnngpt.decoder import KVCache
from gnngpt.guard import one_thread
from gnngpt.models import GPT, BigramLanguageModel
from gnngpt.train import set_rng_state

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--max_iters", "12", "--eval_interval", "3", "--eval_iters", "2", "--batch_size", "4", "--block_size", "16",
        "--device", "cpu", "--learning_rate", "1e-2", "--n_embd", "16", "--n_head", "2", "--n_layer", "1",
        "--dropout", "0.2"]  # dropout: the resumed run must also restore the global RNG


@pytest.fixture(autouse=True)
def one_thread_in_tmp_path(tmp_path, monkeypatch):
    """Tiny models run fastest on one thread (and equal runs need equal thread counts); samples go to tmp_path."""
    monkeypatch.chdir(tmp_path)
    with one_thread():
        yield


@contextlib.contextmanager
def on_forward(callback, training=True):
    """Call callback(output) after each forward pass of a whole model in training (or eval) mode; what it returns,
    where not None, replaces the output."""
    def hook(module, args, output):
        if isinstance(module, (GPT, BigramLanguageModel)) and module.training == training:
            return callback(output)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def at_forward(n, action, training=True):
    """Call action(output) at the n-th forward pass (1-based) of a whole model in training (or eval) mode."""
    calls = 0

    def callback(output):
        nonlocal calls
        calls += 1
        return action(output) if calls == n else None

    return on_forward(callback, training)


def resume(out, data, *args):
    """The exit code of --resume of the run in out, and the training steps it took (its training forward passes):
    a resume that took up its checkpoint trains only the steps after it."""
    passes = []
    with on_forward(passes.append):
        code = run(out, data, "--resume", *args)
    return code, len(passes)


def send(signum):
    return lambda output: os.kill(os.getpid(), signum)


def nan_loss(output):
    logits, loss = output
    return logits, loss * float("nan")


def run(out, data, *args, script=GPT_SCRIPT):
    return main(script, ["--data", str(data), "--out_dir", str(out), *TINY, *args])


def losses(out):
    """(step, train_loss, val_loss) of each row of metrics.csv."""
    with open(Path(out) / "metrics.csv", newline="") as f:
        return [(r["step"], r["train_loss"], r["val_loss"]) for r in csv.DictReader(f)]


def assert_same_state(out_a, out_b):
    a, b = load_checkpoint(Path(out_a) / "ckpt.pt"), load_checkpoint(Path(out_b) / "ckpt.pt")
    assert a["step"] == b["step"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for i, state in a["optimizer"]["state"].items():
        for key in state:
            assert torch.equal(state[key], b["optimizer"]["state"][i][key]), (i, key)


def snapshot(directory):
    return {p.name: p.read_bytes() for p in Path(directory).iterdir()}


@pytest.fixture
def reference(tiny_text_file, tmp_path):
    """A tiny transformer run of TINY, never stopped."""
    out = tmp_path / "reference"
    assert run(out, tiny_text_file) == 0
    return out


@pytest.fixture
def stopped(tiny_text_file, tmp_path):
    """The same run stopped by SIGINT after step 5."""
    out = tmp_path / "stopped"
    with at_forward(5, send(signal.SIGINT)):
        assert run(out, tiny_text_file) == 130
    return out


@pytest.mark.parametrize("stop_step", [1, 6, 7, 11])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_at_any_step_then_resume_equals_the_run_never_stopped(stop_step, signum, reference, tiny_text_file,
                                                                   tmp_path, capsys):
    out = tmp_path / "run"
    with at_forward(stop_step, send(signum)):  # during training step stop_step - 1
        assert run(out, tiny_text_file) == 128 + signum
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"stopped by {signal.Signals(signum).name} after step {stop_step}; "
                          f"checkpoint written to {out / 'ckpt.pt'}; resume with: python gpt.py ")
    assert err.endswith(f"--out_dir {out} {' '.join(TINY)} --resume")
    assert load_checkpoint(out / "ckpt.pt")["step"] == stop_step
    assert [int(s) for s, _, _ in losses(out)] == list(range(0, stop_step, 3))  # step 6's evaluation: on --resume

    assert resume(out, tiny_text_file) == (0, 12 - stop_step)
    assert losses(out) == losses(reference)
    assert_same_state(out, reference)


@pytest.mark.parametrize("stop_step,eval_forward", [(0, 2), (6, 10), (12, 18)])  # 4 forward passes an evaluation
def test_stop_during_an_evaluation_keeps_its_step_and_resume_runs_it_whole(stop_step, eval_forward, reference,
                                                                           tiny_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    later = []
    with at_forward(eval_forward, send(signal.SIGINT), training=False), \
            at_forward(eval_forward + 1, later.append, training=False):
        assert run(out, tiny_text_file) == 130
    assert later == []  # the evaluation stopped before its next batch
    err = capsys.readouterr().err
    assert ("SIGINT: stopping after this step, or within this evaluation, with a checkpoint; press Ctrl-C again to "
            "stop at once, keeping the checkpoint of the last evaluation\n") in err
    assert err.strip().splitlines()[-1].startswith(f"stopped by SIGINT after step {stop_step}; checkpoint written to "
                                                   f"{out / 'ckpt.pt'}; resume with: python gpt.py ")
    assert load_checkpoint(out / "ckpt.pt")["step"] == stop_step
    assert [int(s) for s, _, _ in losses(out)] == list(range(0, stop_step, 3))

    assert resume(out, tiny_text_file) == (0, 12 - stop_step)
    assert losses(out) == losses(reference)
    assert_same_state(out, reference)


def test_a_run_stopped_between_evaluations_and_resumed_to_that_step_ends_evaluated_there(stopped, tiny_text_file,
                                                                                         tmp_path):
    assert run(tmp_path / "five", tiny_text_file, "--max_iters", "5") == 0
    assert resume(stopped, tiny_text_file, "--max_iters", "5") == (0, 0)
    assert [int(s) for s, _, _ in losses(stopped)] == [0, 3, 5]
    assert losses(stopped) == losses(tmp_path / "five")
    assert_same_state(stopped, tmp_path / "five")


def test_two_stops_and_resumes_equal_the_run_never_stopped(reference, stopped, tiny_text_file):
    with at_forward(3, send(signal.SIGTERM)):
        assert run(stopped, tiny_text_file, "--resume") == 143
    assert load_checkpoint(stopped / "ckpt.pt")["step"] == 8
    assert resume(stopped, tiny_text_file) == (0, 4)
    assert losses(stopped) == losses(reference)
    assert_same_state(stopped, reference)


def test_resume_with_more_iterations_equals_a_longer_run(tiny_text_file, tmp_path):
    longer, extended = tmp_path / "longer", tmp_path / "extended"
    assert run(longer, tiny_text_file, "--max_iters", "18") == 0
    assert run(extended, tiny_text_file) == 0
    assert resume(extended, tiny_text_file, "--max_iters", "18") == (0, 6)
    assert losses(extended) == losses(longer)
    assert_same_state(extended, longer)


@pytest.mark.parametrize("target,double,error,retry", [
    ((KVCache, "begin"), failing_cache, CACHE_ERROR, " --no_cache"),  # the cached decoder raised it
    ((torch, "multinomial"), failing_multinomial, MULTINOMIAL_ERROR, ""),
], ids=["decoder", "sampler"])
def test_a_failed_sample_keeps_the_trained_model_which_samples_and_resumes(target, double, error, retry,
                                                                           tiny_text_file, tmp_path, monkeypatch,
                                                                           capsys):
    longer, out = tmp_path / "longer", tmp_path / "run"
    assert run(longer, tiny_text_file, "--max_iters", "18") == 0
    on_disk = []

    def failing(*args, **kwargs):  # sampling starts: what is on disk by then?
        on_disk.append((load_checkpoint(out / "ckpt.pt")["step"], losses(out)))
        return double(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(*target, failing)
        capsys.readouterr()
        assert run(out, tiny_text_file) == 1
    err = capsys.readouterr().err
    command = (f"python sample.py --out_dir {out} --device cpu --num_samples 1 --max_new_tokens 500 --temperature 1 "
               f"--top_k 0{retry}")
    assert err.replace("\r", "\n").endswith(  # after the progress bars
        f"\nerror: writing the sample failed (RuntimeError: {error}); the trained model is saved in "
        f"{out / 'ckpt.pt'}; sample from it with: {command}\n")
    assert "Traceback" not in err
    assert on_disk[0] == (12, losses(longer)[:5])  # the last checkpoint and evaluation, those of step 12

    assert sample.main(shlex.split(command)[2:]) == 0
    assert len(capsys.readouterr().out.split(f"\n{sample.SEPARATOR}\n")[0]) == 1 + 500
    assert resume(out, tiny_text_file, "--max_iters", "18") == (0, 6)
    assert losses(out) == losses(longer)
    assert_same_state(out, longer)


def test_memory_running_out_in_the_final_exact_evaluation_keeps_the_model_and_resume_finishes(tiny_text_file,
                                                                                                tmp_path, monkeypatch,
                                                                                                capsys):
    out, whole = tmp_path / "run", tmp_path / "whole"
    assert run(whole, tiny_text_file) == 0

    with monkeypatch.context() as m:
        m.setattr(cli, "exact_evaluation", allocation_fails)
        capsys.readouterr()
        assert run(out, tiny_text_file) == 1
    err = capsys.readouterr().err
    assert err.replace("\r", "\n").endswith(  # after the progress bars
        f"\nerror: the exact evaluation after the last step does not fit in memory ({ALLOCATION_ERROR}); the "
        f"trained model is saved in {out / 'ckpt.pt'}; finish the run with --resume\n")
    assert "Traceback" not in err and not (out / "eval.json").exists()
    assert resume(out, tiny_text_file) == (0, 0)  # no step trained again: it evaluates and samples
    finished, expected = (json.loads((run_dir / "eval.json").read_text()) for run_dir in (out, whole))
    assert finished.pop("eval_s") >= 0 and expected.pop("eval_s") >= 0
    assert finished == expected


@pytest.mark.parametrize("nan_at,training,message", [
    (8, True, "the training loss is not finite at step 7; training stopped and {ckpt} keeps the last good state "
              "(step 6); train again with --overwrite and a lower --learning_rate"),
    (5, False, "the evaluation loss is not finite at step 3"),  # the first forward pass of the step 3 evaluation
])
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(nan_at, training, message,
                                                                           tiny_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    with at_forward(nan_at, nan_loss, training=training):
        assert run(out, tiny_text_file) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert err.startswith("error: ") and message.format(ckpt=out / "ckpt.pt") in err
    last_good = 6 if training else 0
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["step"] == last_good
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert int(losses(out)[-1][0]) == last_good


def test_a_non_finite_loss_just_after_a_resume_names_the_checkpoint_it_resumed_from(stopped, tiny_text_file, capsys):
    with at_forward(1, nan_loss):  # the first step after step 5
        assert run(stopped, tiny_text_file, "--resume") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: the training loss is not finite at step 5; training stopped and {stopped / 'ckpt.pt'} keeps the last "
        f"good state (step 5); train again with --overwrite and a lower --learning_rate")
    assert load_checkpoint(stopped / "ckpt.pt")["step"] == 5


def test_the_time_and_speed_columns_count_on_across_a_stop_between_evaluations(tiny_text_file, tmp_path):
    out, pause = tmp_path / "run", 0.5
    with at_forward(7, lambda output: time.sleep(pause) or os.kill(os.getpid(), signal.SIGINT)):
        assert run(out, tiny_text_file) == 130  # after step 7, the seventh of them pausing
    rows, ckpt = rundir.read_metrics(out), load_checkpoint(out / "ckpt.pt")
    assert [r["step"] for r in rows] == [0, 3, 6] and ckpt["step"] == 7
    for before, row in zip(rows, rows[1:]):  # a fresh run's speed: the interval's tokens over its training seconds,
        tokens, seconds = row["tokens"] - before["tokens"], row["train_s"] - before["train_s"]  # each rounded to 1e-4
        assert tokens / (seconds + 1e-4) - 0.05 <= row["tokens_per_s"] <= tokens / (seconds - 1e-4) + 0.05
    assert ckpt["train_s"] >= rows[-1]["train_s"] + pause - 1e-4  # step 7's seconds, which no row holds yet
    assert ckpt["elapsed_s"] >= rows[-1]["elapsed_s"] + pause - 0.01
    assert run(out, tiny_text_file, "--resume") == 0
    resumed = rundir.read_metrics(out)[3:]
    assert [r["step"] for r in resumed] == [9, 12]
    assert resumed[0]["train_s"] > ckpt["train_s"] and resumed[0]["elapsed_s"] > ckpt["elapsed_s"]
    assert resumed[1]["train_s"] > resumed[0]["train_s"] and resumed[1]["elapsed_s"] > resumed[0]["elapsed_s"]


def test_a_non_finite_loss_of_the_untrained_model_leaves_no_run(tiny_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    with at_forward(1, nan_loss, training=False):  # the first pass of the evaluation before the first step
        assert run(out, tiny_text_file) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: the evaluation loss is not finite at step 0 ({'train': nan") and err.endswith(
        "); the untrained model gives it, so no learning rate helps; train again with other model settings (such as "
        "--dtype)")
    assert not out.exists()


REFUSED = [
    ([], "holds an unfinished run of this configuration; pass --resume to continue it"),
    (["--n_embd", "32"], "holds a run of another configuration (n_embd was 16, now 32); pass --overwrite"),
    (["--resume", "--n_embd", "32"], "cannot resume {ckpt}: n_embd was 16, now 32; pass the flags of the original run"),
    (["--resume", "--learning_rate", "0.1"], "cannot resume {ckpt}: learning_rate was 0.01, now 0.1"),
    (["--resume", "--seed", "7"], "cannot resume {ckpt}: seed was 1337, now 7"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["--resume", "--max_iters", "4"], "the run in {out} is at step 5, past --max_iters 4; pass a --max_iters above 5 "
                                       "to train it further"),
]


@pytest.mark.parametrize("args,message", REFUSED, ids=[m for _, m in REFUSED])
def test_refusals_name_the_problem_and_change_nothing(args, message, stopped, tiny_text_file, capsys):
    lock = stopped / ".lock"
    lock.write_text("4242\n")  # as another process, the training that stopped, left it
    os.utime(lock, ns=(1_000_000_000, 2_000_000_000))
    before = snapshot(stopped)
    capsys.readouterr()
    assert run(stopped, tiny_text_file, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.format(ckpt=stopped / "ckpt.pt", out=stopped) in err
    assert snapshot(stopped) == before and lock.stat().st_mtime_ns == 2_000_000_000


def test_a_run_without_its_checkpoint_is_refused_with_overwrite_as_the_way_on(tiny_text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(out, tiny_text_file) == 0
    (out / "ckpt.pt").unlink()  # as a committed study keeps its runs: their small files only
    capsys.readouterr()
    assert run(out, tiny_text_file) == 2
    assert capsys.readouterr().err == (f"error: {out} holds a finished run of which only the small files are kept "
                                       f"(no ckpt.pt); pass --overwrite to train it again or choose another "
                                       f"--out_dir\n")
    assert run(out, tiny_text_file, "--resume", "--max_iters", "15") == 2
    assert capsys.readouterr().err == (f"error: nothing to resume: no checkpoint at {out / 'ckpt.pt'}, where only the "
                                       f"small files of a run are kept; pass --overwrite instead of --resume to train "
                                       f"it again\n")
    metrics = (out / "metrics.csv").read_text().splitlines(keepends=True)
    (out / "metrics.csv").write_text("".join(metrics[:3]))  # steps 0 and 3 of 12: unfinished, and trained
    assert run(out, tiny_text_file) == 2
    assert capsys.readouterr().err == (f"error: {out} holds an unfinished run of this configuration without its "
                                       f"checkpoint (ckpt.pt); pass --overwrite to start it again or choose another "
                                       f"--out_dir\n")


@pytest.mark.parametrize("target,signum", [("exact_evaluation", signal.SIGINT), ("write_model_output", signal.SIGINT),
                                           ("exact_evaluation", signal.SIGTERM)])
def test_a_stop_after_the_last_step_gives_the_resume_command_which_finishes_the_run(target, signum, reference,
                                                                                   tiny_text_file, tmp_path,
                                                                                   monkeypatch, capsys):
    out = tmp_path / "out"

    def stop(*args, **kwargs):
        os.kill(os.getpid(), signum)  # a SIGINT raises KeyboardInterrupt, as Ctrl-C does
        time.sleep(5)  # the handler runs before this ends

    with monkeypatch.context() as m:
        m.setattr(cli, target, stop)
        assert run(out, tiny_text_file) == 128 + signum
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    command = shlex.join(["python", "gpt.py", "--data", str(tiny_text_file), "--out_dir", str(out), *TINY, "--resume"])
    assert err == (f"stopped by {signal.Signals(signum).name} before the run finished; its last checkpoint is "
                   f"{out / 'ckpt.pt'}; resume with: {command}")
    assert load_checkpoint(out / "ckpt.pt")["step"] == 12 and not (out / "sample.txt").exists()
    assert run(out, tiny_text_file) == 2
    missing = ("its sample (sample.txt) was written; pass --resume to write it" if target == "write_model_output" else
               "its exact validation loss (eval.json) and its sample (sample.txt) were written; pass --resume to write "
               "them")
    assert capsys.readouterr().err == (f"error: {out} holds a run stopped after its last step, before {missing}, or "
                                       f"--overwrite to replace it\n")
    assert resume(out, tiny_text_file) == (0, 0)  # what it lacks: no step trained again
    assert losses(out) == losses(reference)
    assert_same_state(out, reference)
    exact = [{k: v for k, v in json.loads((d / "eval.json").read_text()).items() if k != "eval_s"}
             for d in (out, reference)]
    assert exact[0] == exact[1]
    for name in ("loss_by_position.csv", "sample.txt"):
        assert (out / name).read_text() == (reference / name).read_text()
    assert run(out, tiny_text_file, "--resume") == 2
    assert capsys.readouterr().err.endswith(f"error: the run in {out} finished at step 12; pass a --max_iters above "
                                            f"12 to train it further\n")


def test_finished_run_is_refused_and_overwrite_replaces_it(reference, tiny_text_file, tmp_path, capsys):
    before = snapshot(reference)
    assert run(reference, tiny_text_file) == 2
    assert f"error: {reference} holds a finished run; pass --overwrite" in capsys.readouterr().err
    assert run(reference, tiny_text_file, "--resume") == 2
    assert capsys.readouterr().err == (f"error: the run in {reference} finished at step 12; pass a --max_iters above "
                                       f"12 to train it further\n")
    assert snapshot(reference) == before

    assert run(reference, tiny_text_file, "--overwrite", "--max_iters", "3") == 0
    assert [int(s) for s, _, _ in losses(reference)] == [0, 3]
    assert load_checkpoint(reference / "ckpt.pt")["step"] == 3


def test_a_second_ctrl_c_while_the_first_stop_is_reported_ends_in_one_line(tiny_text_file, tmp_path,
                                                                           monkeypatch, capsys):
    def second_ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "resume_command", second_ctrl_c)
    with at_forward(5, send(signal.SIGINT)):
        assert run(tmp_path / "run", tiny_text_file) == 130
    assert capsys.readouterr().err.endswith("\ninterrupted\n")  # no traceback
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == 5


def test_a_finished_run_the_repository_ships_is_neither_replaced_nor_trained_further(reference, stopped,
                                                                                     tiny_text_file, tmp_path,
                                                                                     monkeypatch, capsys):
    monkeypatch.setattr(rundir, "SHIPPED_REPORTS", tmp_path)  # as if these runs were the repository's plots/
    before = snapshot(reference)
    for args in (["--overwrite"], ["--resume", "--max_iters", "15"]):
        assert run(reference, tiny_text_file, *args) == 2
        assert capsys.readouterr().err == (f"error: {reference} holds a finished run that this repository ships in "
                                           f"{tmp_path}, which only the command in its report writes; choose another "
                                           f"--out_dir\n")
    assert snapshot(reference) == before
    assert run(stopped, tiny_text_file, "--resume") == 0  # a stopped run there goes on, as its comparison does
    assert [int(s) for s, _, _ in losses(stopped)] == [0, 3, 6, 9, 12]


def test_a_resume_that_cannot_write_metrics_csv_changes_nothing(reference, tiny_text_file, monkeypatch, capsys):
    metrics = reference / "metrics.csv"
    metrics.chmod(0o444)
    real_open = Path.open

    def open_(path, mode="r", *args, **kwargs):  # as the kernel refuses it to anyone but root
        if path == metrics and set(mode) & set("aw+"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    before = snapshot(reference)
    assert run(reference, tiny_text_file, "--resume", "--max_iters", "15") == 2
    assert capsys.readouterr().err == (f"error: could not write {metrics} (Permission denied); make it writable or "
                                       f"choose another --out_dir\n")
    assert snapshot(reference) == before  # its exact loss, sample and config.json are still those of step 12


def test_a_resumed_run_removes_what_a_killed_training_left_of_its_writes(stopped, tiny_text_file):
    left = [".ckpt.pt.x1_k9abc.tmp", ".eval_step4.json.0123456789abcdef.old"]  # atomic_writes' names, as SIGKILL
    # leaves them; not ones it makes, nor its names for files that are not the run's
    kept = [".notes.tmp", "ckpt.pt.abcdefgh.tmp", ".ckpt.pt.ABCDEFGH.tmp", ".notes.txt.x1_k9abc.tmp"]
    for name in left + kept:
        (stopped / name).write_bytes(b"partial")
    assert run(stopped, tiny_text_file, "--resume") == 0
    assert sorted(p.name for p in stopped.iterdir() if p.name in left + kept) == sorted(kept)


def test_resume_of_another_model_text_vocabulary_or_process_count_is_refused(stopped, tiny_text_file, tmp_path, capsys):
    ckpt = stopped / "ckpt.pt"
    assert main(PYG_GPT, ["--data", str(tiny_text_file), "--out_dir", str(stopped), *TINY, "--resume"]) == 2
    assert f"cannot resume {ckpt}: name was gpt, now GATConv" in capsys.readouterr().err

    other_text = tmp_path / "other.txt"
    other_text.write_text(tiny_text_file.read_text().upper())
    assert run(stopped, other_text, "--resume") == 2
    assert f"cannot resume {ckpt}: its vocabulary (" in capsys.readouterr().err
    text = tiny_text_file.read_text()
    other_text.write_text(text[len(text) // 10:])  # the same characters, another text: another validation split
    assert run(stopped, other_text, "--resume") == 2
    assert capsys.readouterr().err == (f"error: cannot resume {ckpt}: --data {other_text} is not the text it was "
                                       f"trained on (that of {tiny_text_file}, by its SHA-256); pass the --data of "
                                       f"the original run\n")

    checkpoint = load_checkpoint(ckpt)
    save_checkpoint(ckpt, {**checkpoint, "rng": checkpoint["rng"] * 2})
    assert run(stopped, tiny_text_file, "--resume") == 2
    assert f"cannot resume {ckpt}: it was trained by 2 process(es), this run has 1" in capsys.readouterr().err

    save_checkpoint(ckpt, checkpoint)
    moved = tmp_path / "moved.txt"
    moved.write_text(text)
    assert run(stopped, moved, "--resume") == 0  # the same text, wherever its file lies now
    assert json.loads((stopped / "config.json").read_text())["data_sha256"] == \
        hashlib.sha256(tiny_text_file.read_bytes()).hexdigest()


def test_resume_without_a_checkpoint_is_refused(tiny_text_file, tmp_path, capsys):
    assert run(tmp_path / "empty", tiny_text_file, "--resume") == 2
    assert "error: nothing to resume: no checkpoint at" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()


@pytest.mark.parametrize("failure", ["device error", "out of memory", "Ctrl-C"])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_run_behind(failure, tiny_text_file, tmp_path,
                                                                          monkeypatch, capsys):
    out = tmp_path / "runs" / "out"
    raised = {"device error": RuntimeError("a device error"), "out of memory": RuntimeError(ALLOCATION_ERROR),
              "Ctrl-C": KeyboardInterrupt()}[failure]

    def fails(sampler, split):
        raise raised  # in the evaluation before the first step, which checkpoints

    def fails_before_checkpoint(*args):
        with monkeypatch.context() as m:
            m.setattr(BatchSampler, "get", fails)
            if failure == "device error":
                with pytest.raises(RuntimeError, match="a device error"):
                    run(out, tiny_text_file, *args)
                return
            assert run(out, tiny_text_file, *args) == (2 if failure == "out of memory" else 130)
        assert capsys.readouterr().err.splitlines()[-1] == ("interrupted" if failure == "Ctrl-C" else (
            f"error: the model and batch do not fit in memory ({ALLOCATION_ERROR}); train again with a lower "
            f"--batch_size, --block_size, --n_embd or --n_layer"))  # no --overwrite: nothing is left to replace

    fails_before_checkpoint()
    assert not (tmp_path / "runs").exists()  # as before: the directories it made go too
    assert run(out, tiny_text_file) == 0
    fails_before_checkpoint("--overwrite")  # the finished run it replaces is gone, and so is its own
    assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK_FILE]
    assert run(out, tiny_text_file) == 0
    assert load_checkpoint(out / "ckpt.pt")["step"] == 12


def test_a_run_killed_before_its_first_checkpoint_is_started_again_with_overwrite(tiny_text_file, tmp_path, capsys):
    done, out = tmp_path / "done", tmp_path / "out"
    assert run(done, tiny_text_file) == 0
    out.mkdir()  # what a training killed in the evaluation before its first step leaves: no code of it ran after
    (out / "config.json").write_bytes((done / "config.json").read_bytes())
    (out / "metrics.csv").write_text((done / "metrics.csv").read_text().splitlines(keepends=True)[0])
    capsys.readouterr()
    assert run(out, tiny_text_file) == 2
    assert capsys.readouterr().err == (f"error: {out} holds a run of this configuration that stopped before its "
                                       f"first checkpoint; pass --overwrite to start it again or choose another "
                                       f"--out_dir\n")
    assert run(out, tiny_text_file, "--resume") == 2
    assert capsys.readouterr().err == (f"error: nothing to resume: no checkpoint at {out / 'ckpt.pt'}, where a run "
                                       f"stopped before its first; pass --overwrite instead of --resume to start it "
                                       f"again\n")
    assert run(out, tiny_text_file, "--overwrite") == 0
    assert load_checkpoint(out / "ckpt.pt")["step"] == 12


GRAPH_RUN = ["--gat_version", "GATConv", "--max_iters", "300", "--eval_interval", "50", "--eval_iters", "2",
             "--batch_size", "4", "--block_size", "16", "--device", "cpu", "--n_embd", "16", "--n_head", "2",
             "--n_layer", "1", "--dropout", "0.1"]


def start_script(args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # bitwise equality needs equal threads
    return subprocess.Popen([sys.executable, str(ROOT / "pyg-gpt.py"), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process):
    try:
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    return process.returncode, out, err


def test_sigint_to_a_training_process_then_resume_equals_the_run_never_stopped(tiny_text_file, tmp_path):
    args = ["--data", str(tiny_text_file), *GRAPH_RUN]
    reference = start_script([*args, "--out_dir", "reference"], tmp_path)
    stopped = start_script([*args, "--out_dir", "stopped"], tmp_path)
    for line in stopped.stdout:
        if line.startswith("step 50:"):  # training is under way: stop it mid-run
            stopped.send_signal(signal.SIGINT)
            break
    code, _, err = finish(stopped)
    assert code == 130, err
    assert "stopped by SIGINT after step" in err and "--resume" in err
    step = load_checkpoint(tmp_path / "stopped" / "ckpt.pt")["step"]
    assert 50 <= step < 300

    code, out, err = finish(start_script([*args, "--out_dir", "stopped", "--resume"], tmp_path))
    assert code == 0, err
    assert "step 0:" not in out and f"step {step}:" not in out and "step 300:" in out  # from its checkpoint on
    assert finish(reference)[0] == 0
    assert losses(tmp_path / "stopped") == losses(tmp_path / "reference")
    assert_same_state(tmp_path / "stopped", tmp_path / "reference")


def test_sigint_during_a_slow_evaluation_of_a_training_process_stops_it_at_once(tiny_text_file, tmp_path):
    """An evaluation of a million batches takes minutes: the process must end within a batch of the signal."""
    args = ["--data", str(tiny_text_file), "--out_dir", "slow", *TINY, "--eval_iters", "1000000"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, str(ROOT / "gpt.py"), *args], cwd=tmp_path, env=env,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 120
            while "training:" not in (tmp_path / "stderr.txt").read_text():  # the progress bar: step 0's evaluation
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=60) == 130
        finally:
            process.kill()
    err = (tmp_path / "stderr.txt").read_text().strip().splitlines()[-1]
    assert err.startswith(f"stopped by SIGINT after step 0; checkpoint written to {Path('slow') / 'ckpt.pt'}; resume "
                          f"with: python gpt.py ") and err.endswith(" --resume")
    checkpoint = load_checkpoint(tmp_path / "slow" / "ckpt.pt")
    assert checkpoint["step"] == 0 and checkpoint["metrics"] == []


def test_a_resumed_run_records_the_most_runs_that_trained_at_once_in_any_part_of_it(tiny_text_file, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv(RUNS_AT_ONCE, "3")  # as compare.py --jobs 3 tells its child trainings
    assert run(out, tiny_text_file, "--max_iters", "6") == 0
    monkeypatch.delenv(RUNS_AT_ONCE)
    assert run(out, tiny_text_file, "--resume") == 0  # alone, to step 12
    assert json.loads((out / "config.json").read_text())["runs_at_once"] == 3
    assert run(tmp_path / "alone", tiny_text_file) == 0
    assert json.loads((tmp_path / "alone" / "config.json").read_text())["runs_at_once"] == 1


def test_a_run_records_the_commit_of_its_code_and_a_resume_under_another_adds_it(tiny_text_file, tmp_path,
                                                                                  monkeypatch):
    from gnngpt import cli

    def code(out):
        return json.loads((out / "config.json").read_text())["code"]

    out = tmp_path / "out"
    monkeypatch.setattr(cli, "code_version", lambda: "a")
    assert run(out, tiny_text_file, "--max_iters", "3") == 0 and code(out) == ["a"]
    monkeypatch.setattr(cli, "code_version", lambda: "b+modified")
    assert run(out, tiny_text_file, "--max_iters", "6", "--resume") == 0 and code(out) == ["a", "b+modified"]
    assert run(out, tiny_text_file, "--resume") == 0 and code(out) == ["a", "b+modified"]
    monkeypatch.setattr(cli, "code_version", lambda: None)  # no git
    assert run(tmp_path / "copy", tiny_text_file) == 0 and code(tmp_path / "copy") == []


def test_the_code_version_is_the_checkouts_commit_marked_where_tracked_files_differ(tmp_path, monkeypatch):
    from gnngpt import cli

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    monkeypatch.setattr(cli, "ROOT", tmp_path)
    assert cli.code_version() is None  # not a checkout
    git("init", "-q")
    (tmp_path / "model.py").write_text("a = 1\n")
    git("add", "model.py")
    git("commit", "-q", "-m", "one")
    commit = git("rev-parse", "HEAD")
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert cli.code_version() == commit
    (tmp_path / "model.py").write_text("a = 2\n")
    assert cli.code_version() == f"{commit}+modified"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no git
    assert cli.code_version() is None


def test_what_runs_after_the_evaluation_a_run_resumes_from_is_not_counted_as_training(tiny_text_file, tmp_path,
                                                                                      monkeypatch):
    from gnngpt import cli, train

    clock = [0.0]  # seconds that a slow exact evaluation adds to the clock the trainer reads
    exact_evaluation = cli.exact_evaluation

    def slow_exact_evaluation(*args):
        clock[0] += 1000
        return exact_evaluation(*args)

    def train_s(out):
        with open(out / "metrics.csv", newline="") as f:
            return float(list(csv.DictReader(f))[-1]["train_s"])

    out = tmp_path / "out"
    assert run(out, tiny_text_file, "--max_iters", "6") == 0
    before = train_s(out)
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + clock[0]))
    monkeypatch.setattr(cli, "exact_evaluation", slow_exact_evaluation)
    assert run(out, tiny_text_file, "--resume", "--exact_at", "6") == 0  # step 6's snapshot on resuming, step 12's
    assert clock[0] == 2000 and 0 < train_s(out) - before < 1000


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5", ""])
def test_a_count_of_runs_at_once_that_is_not_a_positive_integer_is_refused_before_anything_is_written(
        value, tiny_text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(RUNS_AT_ONCE, value)
    assert run(tmp_path / "out", tiny_text_file) == 2
    assert capsys.readouterr().err.strip() == (f"error: {RUNS_AT_ONCE} must be a positive integer (how many trainings "
                                               f"share the machine), got {value!r}; unset it to train alone")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without an MPS device")
def test_random_states_saved_on_a_mac_set_the_cpu_state_where_there_is_no_mps():
    torch.manual_seed(5)
    saved = {"cpu": torch.get_rng_state(), "cuda": [], "mps": torch.get_rng_state()}  # as rng_state on a Mac
    drawn = torch.rand(3)
    set_rng_state(saved)  # as compare.py does to sample a reused run that lacks its sample (any machine's)
    assert torch.equal(torch.rand(3), drawn)
