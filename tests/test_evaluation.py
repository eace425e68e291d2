"""The exact validation loss: equal to a plain loop over windows, deterministic, in nats and bits; evaluate.py."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from conftest import tiny_config, train_tiny_gpt
from gnngpt.evaluation import exact_loss
from gnngpt.models import GPT, BigramConfig, BigramLanguageModel

ROOT = Path(__file__).resolve().parents[1]


def loss_one_window_at_a_time(model, data, T):
    """The mean over every target of data of its cross-entropy in nats and of -log2 of its probability, one window
    of at most T targets per forward pass."""
    nats, bits, targets = 0.0, 0.0, 0
    for i in range(0, len(data) - 1, T):
        x, y = data[i:i + T], data[i + 1:i + T + 1]
        x = x[:len(y)]
        logits, _ = model(x[None])
        nats += F.cross_entropy(logits[0].double(), y, reduction="sum").item()
        bits -= torch.log2(torch.softmax(logits[0].double(), dim=-1)[torch.arange(len(y)), y]).sum().item()
        targets += len(y)
    assert targets == len(data) - 1
    return nats / targets, bits / targets


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
])
def test_evaluate_py_refuses_bad_input_in_one_line(tiny_run, tmp_path, content, args, message):
    other = tmp_path / "other.txt"
    other.write_text(content)
    result = evaluate(["--out_dir", str(tiny_run("gpt")), "--data", str(other), *args], cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message.format(other=other))


def test_evaluate_py_without_the_runs_text_says_how_to_go_on(in_tmp_path, tiny_text_file):
    assert train_tiny_gpt("run", "tiny.txt", "--max_iters", "2") == 0  # a text named relative to here
    (in_tmp_path / "elsewhere").mkdir()
    result = evaluate(["--out_dir", str(in_tmp_path / "run")], cwd=in_tmp_path / "elsewhere")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.endswith("is not here; run from the directory it was trained in, or evaluate another file "
                                  "with --data FILE\n")
