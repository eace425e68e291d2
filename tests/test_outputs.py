"""Runs outside the default run directory, and comparisons and figures of them, leave what the project ships alone."""
import hashlib
import subprocess
from pathlib import Path

import matplotlib.image
import pytest

import compare
import evaluate
import plot_attention
import sample
from conftest import train_tiny_gpt
from gnngpt.checkpoint import load_checkpoint, save_checkpoint
from gnngpt.rundir import TRAINING_STATE

ROOT = Path(__file__).resolve().parents[1]
COMPARE_TINY = ["--models", "bigram,gpt", "--max_iters", "2", "--eval_interval", "2", "--eval_iters", "1",
                "--batch_size", "2", "--block_size", "8", "--n_embd", "8", "--n_head", "2", "--n_layer", "1",
                "--device", "cpu"]


def repository_files():
    """{path: sha256 or None when deleted} of every file that git tracks in the repository or would add (untracked
    and not ignored)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the repository as a git work tree")
    paths = [ROOT / name for name in listed.decode().split("\0") if name]
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None for path in paths}


def test_runs_comparisons_and_figures_elsewhere_change_no_file_of_the_repository(tiny_text_file, tmp_path,
                                                                                 monkeypatch, capsys):
    before = repository_files()
    monkeypatch.chdir(ROOT)  # where model_outputs/ and plots/ are the committed ones
    monkeypatch.setattr("gnngpt.sampling.SAMPLE_LENGTH", 20)
    trial, runs = tmp_path / "trial", tmp_path / "runs"
    assert train_tiny_gpt(trial, tiny_text_file, "--max_iters", "2") == 0
    assert repository_files() == before
    comparison = ["--data", str(tiny_text_file), "--runs", str(runs), *COMPARE_TINY]
    assert compare.main(comparison) == 0
    assert repository_files() == before
    trained = (runs / "gpt_s1337" / "sample.txt").read_text()
    (runs / "gpt_s1337" / "sample.txt").unlink()
    assert compare.main(comparison) == 0  # reuses both runs and writes gpt's sample again, from its checkpoint
    assert (runs / "gpt_s1337" / "sample.txt").read_text() == trained  # drawn from the training's random states
    assert repository_files() == before
    assert plot_attention.main(["--out_dir", str(trial), "--prompt", "To be"]) == 0
    assert repository_files() == before

    assert len((trial / "sample.txt").read_text()) == 21
    for name in ("bigram", "gpt"):
        sample = (runs / f"{name}_s1337" / "sample.txt").read_text()
        assert len(sample) == 21 and (runs / "model_outputs" / f"{name}.txt").read_text() == sample
    assert f"wrote {runs / 'gpt_s1337' / 'sample.txt'}\n" in capsys.readouterr().out
    results = (runs / "results.md").read_text()  # --out defaults to the --runs directory
    assert f"Samples: `{(runs / 'model_outputs' / 'bigram.txt').as_posix()}` (seed 1337), " \
           f"`{(runs / 'model_outputs' / 'gpt.txt').as_posix()}` (seed 1337)" in results
    assert matplotlib.image.imread(runs / "val_loss.png").ndim == 3
    assert matplotlib.image.imread(trial / "attention.png").ndim == 3


def test_a_checkpoint_of_the_weights_alone_is_sampled_evaluated_and_given_its_missing_sample(tiny_text_file,
                                                                                              tmp_path, monkeypatch):
    monkeypatch.setattr("gnngpt.sampling.SAMPLE_LENGTH", 20)
    runs = tmp_path / "runs"
    comparison = ["--data", str(tiny_text_file), "--runs", str(runs), *COMPARE_TINY]
    assert compare.main(comparison) == 0
    run = runs / "gpt_s1337"
    checkpoint = load_checkpoint(run / "ckpt.pt")
    save_checkpoint(run / "ckpt.pt", {k: v for k, v in checkpoint.items() if k == "step" or k not in TRAINING_STATE})
    samples = []
    for _ in range(2):  # drawn from the run's seed where no random states were saved: the same each time
        (run / "sample.txt").unlink()
        assert compare.main(comparison) == 0
        samples.append((run / "sample.txt").read_text())
    assert len(samples[0]) == 21 and samples[1] == samples[0]
    assert sample.main(["--out_dir", str(run), "--max_new_tokens", "5", "--device", "cpu"]) == 0
    assert evaluate.main(["--out_dir", str(run), "--data", str(tiny_text_file)]) == 0
