"""The exact validation loss: equal to a plain loop over windows, deterministic, in nats and bits; evaluate.py."""
import json
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import evaluate as evaluate_py
from conftest import ALLOCATION_ERROR, allocation_fails, tiny_config, train_tiny_gpt
from gnngpt import rundir
from gnngpt.data import split
from gnngpt.errors import UsageError
from gnngpt.evaluation import describe, exact_evaluation, exact_loss, read_loss_by_position, run_validation_split
from gnngpt.models import GPT, BigramConfig, BigramLanguageModel

ROOT = Path(__file__).resolve().parents[1]


def losses_one_window_at_a_time(model, data, T):
    """The cross-entropy in nats and -log2 of the probability of every target of data, each with its offset in its
    window, one window of at most T targets per forward pass: [(offset, nats, bits), ...]."""
    losses = []
    for i in range(0, len(data) - 1, T):
        x, y = data[i:i + T], data[i + 1:i + T + 1]
        x = x[:len(y)]
        logits, _ = model(x[None])
        for t in range(len(y)):
            nats = F.cross_entropy(logits[0, t].double(), y[t]).item()
            losses.append((t, nats, -torch.log2(torch.softmax(logits[0, t].double(), dim=-1)[y[t]]).item()))
    assert len(losses) == len(data) - 1
    return losses


def loss_one_window_at_a_time(model, data, T):
    """The mean over every target of data of its cross-entropy in nats and of -log2 of its probability."""
    losses = losses_one_window_at_a_time(model, data, T)
    return statistics.fmean(n for _, n, _ in losses), statistics.fmean(b for _, _, b in losses)


@pytest.mark.parametrize("length", [49, 50, 8])  # a tail of 0 targets, of 1, and a single shorter window
@pytest.mark.parametrize("model", ["gpt", "GATv2Conv", "bigram"])
def test_exact_loss_equals_a_loop_over_windows_and_is_deterministic(model, length):
    net = BigramLanguageModel(BigramConfig(vocab_size=17)) if model == "bigram" else \
        GPT(tiny_config("attention" if model == "gpt" else model, dropout=0.3))
    net.train()  # exact_loss evaluates in eval mode, and leaves the mode as it found it
    data = torch.randint(0, 17, (length,))
    result = exact_loss(net, data, 12, 3, "cpu", progress=False)
    assert net.training
    net.eval()
    assert result["targets"] == length - 1
    nats, bits = loss_one_window_at_a_time(net, data, 12)
    assert (result["nats"], result["bits"]) == pytest.approx((nats, bits), rel=1e-6)
    assert exact_loss(net, data, 12, 5, "cpu", progress=False) == pytest.approx(result, rel=1e-6)
    assert exact_loss(net, data, 12, 3, "cpu", progress=False) == result


@pytest.mark.parametrize("length", [61, 50])  # halves of 30 and 31 tokens (a tail in each), of 25 and 25
def test_each_half_and_each_position_equal_a_loop_over_their_own_windows(length):
    net = GPT(tiny_config("GATv2Conv", block_size=12)).eval()
    data = torch.randint(0, 17, (length,))
    result = exact_evaluation(net, data, {"block_size": 12, "batch_size": 3}, "cpu")

    assert (result["nats"], result["bits"]) == pytest.approx(loss_one_window_at_a_time(net, data, 12), rel=1e-6)
    cut = length // 2  # the first half tunes, the second reports; each windowed on its own
    for part, half in (("tune", data[:cut]), ("test", data[cut:])):
        assert result[part]["targets"] == len(half) - 1
        expected = loss_one_window_at_a_time(net, half, 12)
        assert (result[part]["nats"], result[part]["bits"]) == pytest.approx(expected, rel=1e-6)

    losses = losses_one_window_at_a_time(net, data, 12)
    by_position = result["by_position"]
    assert by_position["targets"] == [sum(t == offset for t, _, _ in losses) for offset in range(12)]
    assert sum(by_position["targets"]) == result["targets"] == length - 1
    for offset in range(12):
        expected = statistics.fmean(n for t, n, _ in losses if t == offset)
        assert by_position["loss"][offset] == pytest.approx(expected, rel=1e-6)
    weighted = sum(loss * n for loss, n in zip(by_position["loss"], by_position["targets"])) / result["targets"]
    assert weighted == pytest.approx(result["nats"], rel=1e-9)


def test_an_exact_evaluation_passes_batches_of_its_batch_size_or_else_the_runs():
    net = GPT(tiny_config("attention")).eval()
    data = torch.randint(0, 17, (100,))  # 99 targets: 8 windows of 12 and a tail of 3
    passes = []
    handle = net.register_forward_hook(lambda module, args, output: passes.append(args[0].shape))
    try:
        for batch_size, sizes in ((None, [5, 3, 1]), (2, [2, 2, 2, 2, 1])):
            passes.clear()
            exact_evaluation(net, data, {"block_size": 12, "batch_size": 5}, "cpu", batch_size, with_halves=False)
            assert [shape[0] for shape in passes] == sizes
            assert [shape[1] for shape in passes] == [12] * (len(sizes) - 1) + [3]
    finally:
        handle.remove()


def evaluate(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_evaluate_py_scores_the_validation_split_and_another_file(tiny_run, tmp_path):
    run = tiny_run("gpt")
    stored = json.loads((run / "eval.json").read_text())
    result = evaluate(["--out_dir", str(run), "--json"], cwd=run.parent)  # where the run's text is
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert (printed["split"], printed["targets"]) == ("val", stored["targets"])
    assert round(printed["nats"], 6) == stored["val_loss"] and round(printed["bits"], 6) == stored["val_bpc"]
    for part in ("tune", "test"):
        assert (round(printed[part]["nats"], 6), printed[part]["targets"]) == \
            (stored[f"{part}_loss"], stored[f"{part}_targets"])
    assert printed["by_position"]["targets"] == read_loss_by_position(run)["targets"]
    assert printed["by_position"]["loss"] == pytest.approx(read_loss_by_position(run)["loss"], abs=1e-6)

    result = evaluate(["--out_dir", str(run), "--json", "--random_estimates", "3"], cwd=run.parent)
    estimates = json.loads(result.stdout)["random_estimates"]
    assert estimates["eval_iters"] == 1 and len(set(estimates["values"])) == 3  # each draw its own batches
    assert estimates["sd"] == pytest.approx(statistics.stdev(estimates["values"]))
    assert estimates["mean"] == pytest.approx(statistics.fmean(estimates["values"]))

    other = tmp_path / "other.txt"
    text = (run.parent / "tiny.txt").read_text()[:300]
    other.write_text(text)
    result = evaluate(["--out_dir", str(run), "--data", str(other)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"gpt ({run}) on all of {other}: exact validation loss ")
    assert f"bits per character ({len(text) - 1:,} characters)" in result.stdout


@pytest.mark.parametrize("content,args,message", [
    ("Tó be¿", [], "error: {other} has characters outside the model's vocabulary: 'ó' '¿'; evaluate a text made "
                   "only of characters of the training text\n"),
    ("To be", ["--batch_size", "0"], "error: --batch_size must be a positive integer, got 0\n"),
    ("To be", ["--random_estimates", "1"], "error: --random_estimates must be 0 or at least 2 (a deviation needs "
                                           "two), got 1\n"),
    ("To be", ["--random_estimates", "2"], "error: --random_estimates draws windows of block_size + 1 = 17 "
                                           "characters, and all of {other} has 5; drop --random_estimates, or give a "
                                           "longer --data\n"),
    ("T", [], "error: {other} has one character, and the evaluation predicts each character after the first; give "
              "a --data of two or more\n"),
    ("To be", ["--write"], "error: --write records the run's own validation split in its eval.json; drop --data or "
                           "--write\n"),
])
def test_evaluate_py_refuses_bad_input_in_one_line(tiny_run, tmp_path, content, args, message):
    other = tmp_path / "other.txt"
    other.write_text(content)
    result = evaluate(["--out_dir", str(tiny_run("gpt")), "--data", str(other), *args], cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message.format(other=other))


@pytest.mark.parametrize("args,patched,message", [
    (["--batch_size", "4"], "exact_evaluation", "the evaluation in batches of 4 windows does not fit in memory ({}); "
                                                "evaluate in smaller batches with a lower --batch_size"),
    (["--batch_size", "1"], "exact_evaluation", "the evaluation one window at a time does not fit in memory ({}); a "
                                                "single window does not fit either: free memory on the device"),
    (["--random_estimates", "2"], "random_estimates", "the random estimates in batches of 2 windows, the run's, do not "
                                                      "fit in memory ({}); drop --random_estimates"),
])
def test_evaluate_py_says_what_to_lower_when_memory_runs_out(args, patched, message, tiny_run, monkeypatch, capsys):
    run = tiny_run("gpt")
    monkeypatch.chdir(run.parent)  # where the run's text is
    monkeypatch.setattr(evaluate_py, patched, allocation_fails)
    capsys.readouterr()
    assert evaluate_py.main(["--out_dir", str(run), *args]) == 2
    err = capsys.readouterr().err  # after the exact evaluation's progress bars, where it ran
    assert err.endswith("\n") and err.splitlines()[-1] == f"error: {message.format(ALLOCATION_ERROR)}"


@pytest.mark.parametrize("change,message", [
    (lambda config: {}, "error: {run} has no readable config.json; evaluate a run written by this project\n"),
    (lambda config: {**config, "data": None}, "error: {run} has no readable config.json; "),
    (lambda config: {**config, "settings": 5}, "error: {run} has no readable config.json; "),
    (lambda config: {**config, "model_config": 5, "settings": {k: v for k, v in config["settings"].items()
                                                               if k not in ("graph", "pos")}},  # as an older run's
     "error: {run} has no readable config.json; "),
    (lambda config: {**config, "settings": {**config["settings"], "block_size": "16"}},
     "error: {run} has no readable config.json; "),
    (lambda config: {**config, "settings": {**config["settings"], "block_size": 8}},
     "error: {run}/config.json (gpt, block_size 8) is not that of its ckpt.pt (gpt, block_size 16); evaluate a run "
     "whose files are its own\n"),
    (lambda config: {**config, "name": "GATConv"}, "error: {run}/config.json (GATConv, block_size 16) is not that of "
                                                   "its ckpt.pt (gpt, block_size 16); "),
    (lambda config: {**config, "data_sha256": "0" * 64},  # the checkpoint of a run on another text
     "error: {run}/ckpt.pt was trained on another text than its config.json records (by their data_sha256); "
     "evaluate a run whose files are its own\n"),
])
def test_evaluate_py_refuses_a_config_json_not_written_for_its_checkpoint(tiny_run, tmp_path, monkeypatch, capsys,
                                                                         change, message):
    run = tmp_path / "run"
    shutil.copytree(tiny_run("gpt"), run)
    monkeypatch.chdir(tiny_run("gpt").parent)  # where the run's training text is
    capsys.readouterr()  # the training's output, should this test train the run
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(change(config)))
    assert evaluate_py.main(["--out_dir", str(run), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(message.format(run=run))


def test_evaluate_py_writes_the_eval_json_a_training_writes(in_tmp_path, tiny_text_file):
    assert train_tiny_gpt("run", "tiny.txt", "--max_iters", "3") == 0
    trained = {name: (in_tmp_path / "run" / name).read_text() for name in ("eval.json", "loss_by_position.csv")}
    for name in trained:
        (in_tmp_path / "run" / name).unlink()
    result = evaluate(["--out_dir", "run", "--write"], cwd=in_tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("wrote run/eval.json and loss_by_position.csv\n")
    assert (in_tmp_path / "run" / "loss_by_position.csv").read_text() == trained["loss_by_position.csv"]
    written, expected = (json.loads(text) for text in ((in_tmp_path / "run" / "eval.json").read_text(),
                                                        trained["eval.json"]))
    assert written.pop("eval_s") >= 0 and expected.pop("eval_s") >= 0
    assert written == expected and written["step"] == 3
    val = split(torch.tensor([0] * len(tiny_text_file.read_text())))[1]
    assert written["tune_targets"] + written["test_targets"] == written["targets"] - 1 == len(val) - 2


def test_evaluate_py_writes_no_eval_json_over_a_shipped_runs(tiny_run, tmp_path, monkeypatch, capsys):
    run = shutil.copytree(tiny_run("gpt"), tmp_path / "plots" / "study" / "runs" / "gpt")  # its ckpt.pt kept there
    monkeypatch.setattr(rundir, "SHIPPED_REPORTS", tmp_path / "plots")  # as if this were the repository's
    monkeypatch.chdir(tiny_run("gpt").parent)  # where its text is
    stored = {name: (run / name).read_bytes() for name in ("eval.json", "loss_by_position.csv")}
    capsys.readouterr()
    assert evaluate_py.main(["--out_dir", str(run), "--write", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (f"error: {run} is a run this repository ships, whose eval.json only the "
                                       f"command in its report writes; drop --write, or evaluate a copy of the run\n")
    assert {name: (run / name).read_bytes() for name in stored} == stored
    assert evaluate_py.main(["--out_dir", str(run), "--device", "cpu"]) == 0  # evaluated, not written
    assert {name: (run / name).read_bytes() for name in stored} == stored
    (run / "eval.json").unlink()  # a run whose training stopped before its exact loss: written as it would be
    assert evaluate_py.main(["--out_dir", str(run), "--write", "--device", "cpu"]) == 0
    assert json.loads((run / "eval.json").read_text())["step"] == 2


def test_evaluate_py_without_the_runs_text_says_how_to_go_on(in_tmp_path, tiny_text_file):
    assert train_tiny_gpt("run", "tiny.txt", "--max_iters", "2") == 0  # a text named relative to here
    (in_tmp_path / "elsewhere").mkdir()
    result = evaluate(["--out_dir", str(in_tmp_path / "run")], cwd=in_tmp_path / "elsewhere")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.endswith("is not here; run from the directory it was trained in, or evaluate another file "
                                  "with --data FILE\n")


def test_evaluate_py_refuses_a_text_that_is_not_the_one_the_run_trained_on(tiny_run, tmp_path, monkeypatch, capsys):
    run, text = tiny_run("gpt"), (tiny_run("gpt").parent / "tiny.txt").read_text()
    shutil.copytree(run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "data": "tiny.txt"}))  # the text beside it
    (tmp_path / "tiny.txt").write_text(text + text[:500])  # the same characters, a longer validation split
    monkeypatch.chdir(tmp_path)
    stored = {name: (tmp_path / "run" / name).read_bytes() for name in ("eval.json", "loss_by_position.csv")}
    capsys.readouterr()
    assert evaluate_py.main(["--out_dir", "run", "--write", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("error: tiny.txt is not the text the run was trained on (by the data_sha256 of "
                                       "its config.json); restore that text, or evaluate another file with --data "
                                       "FILE\n")
    assert {name: (tmp_path / "run" / name).read_bytes() for name in stored} == stored


def test_a_failed_download_of_a_runs_default_text_says_where_to_put_it(in_tmp_path, monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        monkeypatch.setattr("gnngpt.data.DATA_URL", f"http://127.0.0.1:{s.getsockname()[1]}/input.txt")
    with pytest.raises(UsageError) as e:
        run_validation_split({"data": "input.txt"}, list("abc"), "evaluate another file with --data FILE")
    assert str(e.value).endswith("; check the connection or put the run's training text, tinyshakespeare, in "
                                 "input.txt")  # not --data, which evaluates another file whole
    assert list(in_tmp_path.iterdir()) == []


@pytest.mark.parametrize("targets,count", [(1, "1 character"), (2, "2 characters"), (1234, "1,234 characters")])
def test_an_evaluation_counts_its_characters_in_words(targets, count):
    assert describe({"nats": 1.0, "bits": 1.4427, "targets": targets}).endswith(f"per character ({count})")
