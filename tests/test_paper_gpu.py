"""scripts/paper_gpu.sh, the published comparison on a GPU, run whole on the CPU at a tiny size."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image

from gnngpt.config import PUBLISHED_VAL_LOSS
from gnngpt.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--data", "tiny.txt", "--max_iters", "20", "--batch_size", "4", "--block_size", "16",
        "--n_embd", "16", "--n_head", "2", "--n_layer", "1", "--eval_iters", "2",
        "--jobs", "1"]  # one process: --jobs is tested in test_compare.py, and each process costs seconds of imports


def test_the_script_writes_the_paper_comparison_with_the_published_values(tmp_path, tiny_text_file):
    env = {**os.environ, "PAPER_STEPS": "compare", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "TORCHDYNAMO_DISABLE": "1"}  # the fused GATv2 kernel would take a minute to compile on this CPU
    result = subprocess.run(["bash", str(ROOT / "scripts" / "paper_gpu.sh"), "logs", *TINY], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(path.name for path in (tmp_path / "logs").iterdir()) == ["compare.log", "summary.txt"]

    assert matplotlib.image.imread(tmp_path / "plots" / "paper" / "val_loss.png").shape[0] > 100
    results = (tmp_path / "plots" / "paper" / "results.md").read_text()
    lines = [line for line in results.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| model | val loss (nats) | bits per character | published |")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [(row[0], row[3]) for row in rows] == [(name, f"{loss:.2f}") for name, loss in PUBLISHED_VAL_LOSS.items()]
    for row in rows:
        run = tmp_path / "plots" / "paper" / "runs" / f"{row[0]}_s1337"  # its small files kept beside the results
        assert [m["step"] for m in read_metrics(run)] == [0, 20]  # evaluated every 1000 steps, and after the last
        exact = json.loads((run / "eval.json").read_text())
        assert row[1] == f"{exact['val_loss']:.4f} (1)" and row[9] == "paper"
        sample = (run / "sample.txt").read_text()
        assert len(sample) == 501 and (tmp_path / "plots" / "paper" / "model_outputs" / f"{row[0]}.txt").read_text() \
            == sample
    assert "- eval_interval 1000 instead of 50 (all models)\n" in results
    assert "- max_iters 20 instead of 5000 (all models but bigram)\n" in results
    assert "Samples: `plots/paper/model_outputs/bigram.txt` (seed 1337), `plots/paper/model_outputs/gpt.txt` " \
           "(seed 1337), " in results
    assert not (tmp_path / "model_outputs").exists()  # the shipped samples are the published size's

    summary = (tmp_path / "logs" / "summary.txt").read_text()
    assert re.search(r"^compare: exit 0 after \d+ s \(limit \d+ s\): .*/compare.py .* --preset paper .* "
                     r"--eval_interval 1000 ", summary, re.MULTILINE)
    assert summary.endswith(results)


def test_the_script_exits_with_the_status_of_a_failed_step(tmp_path, tiny_text_file):
    env = {**os.environ, "PAPER_STEPS": "compare", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "paper_gpu.sh"), "logs", *TINY, "--jobs", "0"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stdout + result.stderr
    summary = (tmp_path / "logs" / "summary.txt").read_text()
    assert re.search(r"^compare: exit 2 after \d+ s \(limit \d+ s\): .* --jobs 0$", summary, re.MULTILINE)
    assert (tmp_path / "logs" / "compare.log").read_text() == "error: --jobs must be a positive integer, got 0\n"
