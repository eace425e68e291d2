import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest

import compare
from conftest import tensorboard_scalars, wandb_runs
from gnngpt import cli, guard
from gnngpt.data import BatchSampler
from gnngpt.guard import one_thread
from gnngpt.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--max_iters", "4", "--eval_interval", "2", "--eval_iters", "2", "--batch_size", "4", "--block_size", "16",
        "--n_embd", "16", "--n_head", "2", "--n_layer", "1", "--device", "cpu"]


@pytest.fixture
def trainings(monkeypatch, in_tmp_path, tiny_text_file):
    """Run compare.main in tmp_path (where tiny.txt is); the (script file, argv) of every training it starts."""
    calls = []
    real_main = cli.main
    monkeypatch.setattr(cli, "main",
                        lambda script, argv: calls.append((script.filename, argv)) or real_main(script, argv))
    return calls


def compare_main(*args):
    return compare.main(["--data", "tiny.txt", *TINY, *args])


def table_rows(markdown):
    """The cells of each row of the first markdown table, header and rule left out."""
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def test_two_models_give_a_plot_a_table_and_samples_then_reuse_trains_nothing(trainings, tiny_text_file, tmp_path):
    assert compare_main("--models", "bigram,GATConv") == 0
    assert [script for script, _ in trainings] == ["bigram.py", "pyg-gpt.py"]

    image = matplotlib.image.imread(tmp_path / "plots" / "val_loss.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    results = (tmp_path / "plots" / "results.md").read_text()
    assert "- graph " not in results and "- pos " not in results  # the original's graph and positions: no note
    rows = table_rows(results)
    assert [row[0] for row in rows] == ["bigram", "GATConv"]
    for row in rows:
        run = tmp_path / "runs" / row[0]
        config = json.loads((run / "config.json").read_text())
        metrics = read_metrics(run)
        assert row[1] == f"{metrics[-1]['val_loss']:.4f}"
        assert row[2].startswith(f"{min(m['val_loss'] for m in metrics):.4f} (")
        assert row[3] == f"{config['parameters']:,}"
        assert row[6] == "cpu" and row[7] == "cpu" and row[8] == config["machine"]
        assert len((tmp_path / "model_outputs" / f"{row[0]}.txt").read_text()) == 21
    assert f"preset cpu, {config['machine']}" in results
    assert "python compare.py --data tiny.txt --max_iters 4" in results

    (tmp_path / "model_outputs" / "bigram.txt").unlink()
    checkpoint = (tmp_path / "runs" / "GATConv" / "ckpt.pt").read_bytes()
    (tmp_path / "plots" / "results.md").unlink()
    trainings.clear()
    assert compare_main("--models", "bigram,GATConv") == 0
    assert trainings == []
    assert (tmp_path / "runs" / "GATConv" / "ckpt.pt").read_bytes() == checkpoint
    assert len((tmp_path / "model_outputs" / "bigram.txt").read_text()) == 21  # written again from the checkpoint
    assert table_rows((tmp_path / "plots" / "results.md").read_text()) == rows


def test_paper_runs_show_the_published_losses_and_every_setting_that_is_not_the_presets(trainings, tmp_path):
    assert compare_main("--models", "gpt,GCNConv", "--preset", "paper") == 0
    results = (tmp_path / "plots" / "results.md").read_text()
    assert "| model | final val loss | published | best val loss (step) |" in results
    assert [(row[0], row[2]) for row in table_rows(results)] == [("gpt", "1.50"), ("GCNConv", "-")]
    assert "published: the original's validation loss after 5000 steps of the paper preset" in results
    assert "- eval_interval 2 instead of 50 (all models)\n- eval_iters 2 instead of 200 (all models)\n" in results
    assert "dropout" not in results  # TINY keeps the preset's


def test_runs_with_other_settings_are_refused_or_replaced_with_overwrite(trainings, tmp_path, capsys):
    assert compare_main("--models", "bigram,gpt") == 0
    trainings.clear()
    capsys.readouterr()
    assert compare_main("--models", "bigram,gpt", "--n_embd", "8") == 2
    assert capsys.readouterr().err == ("error: runs/gpt already hold runs that do not match these settings; pass "
                                       "--overwrite to replace them or --runs DIR to train elsewhere\n")
    assert trainings == []
    assert compare_main("--models", "bigram,gpt", "--n_embd", "8", "--overwrite") == 0  # bigram has no width
    assert [script for script, _ in trainings] == ["gpt.py"]
    assert json.loads((tmp_path / "runs" / "gpt" / "config.json").read_text())["settings"]["n_embd"] == 8
    trainings.clear()
    assert compare_main("--models", "bigram,gpt", "--n_embd", "8", "--seed", "3", "--overwrite") == 0
    assert [script for script, _ in trainings] == ["bigram.py", "gpt.py"]


def test_a_stopped_comparison_resumes_where_it_stopped(trainings, tmp_path, monkeypatch, capsys):
    real_get = BatchSampler.get
    batches = []

    def interrupt_at_step_3(sampler, split):
        batches.append(split)
        if batches.count("train") == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the third step
        return real_get(sampler, split)

    monkeypatch.setattr(BatchSampler, "get", interrupt_at_step_3)
    assert compare_main("--models", "gpt") == 130
    assert capsys.readouterr().err.endswith("compare.py stopped; run the same command again to go on: finished runs "
                                            "are reused and stopped ones resume\n")
    assert not (tmp_path / "plots").exists()
    monkeypatch.setattr(BatchSampler, "get", real_get)
    assert compare_main("--models", "gpt") == 0
    assert "--resume" in trainings[-1][1]
    assert [m["step"] for m in read_metrics(tmp_path / "runs" / "gpt")] == [0, 2, 4]
    assert table_rows((tmp_path / "plots" / "results.md").read_text())[0][0] == "gpt"


def test_all_layers_trains_every_working_layer_and_writes_a_leaderboard(trainings, tiny_text_file, tmp_path,
                                                                         monkeypatch):
    records = [SimpleNamespace(name="GATConv", works=True, reason=""),
               SimpleNamespace(name="DenseGCNConv", works=False, reason="dense layer: takes a (B, N, N) adjacency"),
               SimpleNamespace(name="GATv2Conv", works=True, reason="")]
    monkeypatch.setattr(guard, "layer_support", lambda: records, raising=False)
    assert compare_main("--models", "all-layers", "--out", "board") == 0
    assert [argv[argv.index("--gat_version") + 1] for _, argv in trainings] == ["GATConv", "GATv2Conv"]

    image = matplotlib.image.imread(tmp_path / "board" / "leaderboard.png")
    assert image.ndim == 3 and image.shape[0] > 50
    board = (tmp_path / "board" / "leaderboard.md").read_text()
    rows = table_rows(board)
    final = {name: read_metrics(tmp_path / "runs" / name)[-1]["val_loss"] for name in ("GATConv", "GATv2Conv")}
    assert [row[1] for row in rows] == sorted(final, key=final.get)
    assert [row[0] for row in rows] == ["1", "2"]
    assert [float(row[2]) for row in rows] == sorted(final.values())
    assert "- DenseGCNConv: dense layer: takes a (B, N, N) adjacency" in board
    assert not (tmp_path / "board" / "val_loss.png").exists()  # the four-model comparison is left alone


def test_failed_trainings_are_reported_and_exit_1(trainings, tiny_text_file, tmp_path, capsys):
    assert compare_main("--models", "bigram,gpt", "--block_size", "5000") == 1
    err = capsys.readouterr().err
    assert "--data has too little text for block_size 5000" in err
    assert err.endswith("error: training failed for bigram, gpt (see the errors above); run compare.py again to "
                        "retry them: finished runs are reused\n")
    assert not (tmp_path / "plots").exists()


def test_a_crashing_training_is_reported_and_the_others_go_on(trainings, tiny_text_file, tmp_path, monkeypatch,
                                                              capsys):
    real_main = cli.main

    def crash_gpt(script, argv):
        if script.filename == "gpt.py":
            raise RuntimeError("out of memory\nmore details")
        return real_main(script, argv)

    monkeypatch.setattr(cli, "main", crash_gpt)
    assert compare_main("--models", "gpt,bigram") == 1
    err = capsys.readouterr().err
    assert "error: gpt failed: out of memory\n" in err and "more details" not in err
    assert [row[0] for row in table_rows((tmp_path / "plots" / "results.md").read_text())] == ["bigram"]


def test_tracking_flags_pass_through_and_each_model_is_one_tracked_run(offline_wandb, trainings, tmp_path):
    pytest.importorskip("tensorboard")
    assert compare_main("--models", "bigram,gpt", "--wandb_log", "--wandb_project", "comparison", "--tensorboard") == 0
    flags = ["--wandb_log", "--wandb_project", "comparison", "--tensorboard"]
    assert all(argv[argv.index("--wandb_log"):][:4] == flags for _, argv in trainings)
    for name in ("bigram", "gpt"):
        run = tmp_path / "runs" / name
        steps = [row["step"] for row in read_metrics(run)]
        (wandb_run,) = wandb_runs(run)
        assert (wandb_run["project"], wandb_run["name"], list(wandb_run["history"])) == ("comparison", name, steps)
        assert [step for step, _ in tensorboard_scalars(run)["val/loss"]] == steps
    trainings.clear()
    assert compare_main("--models", "bigram,gpt") == 0  # finished runs are reused whether tracked or not
    assert trainings == []


def test_changed_gnn_kwargs_are_not_reused(trainings, tiny_text_file, tmp_path):
    assert compare_main("--models", "TAGConv", "--gnn_kwargs", '{"K": 2}') == 0
    assert compare_main("--models", "TAGConv", "--gnn_kwargs", '{"K": 2}') == 0
    assert len(trainings) == 1
    assert compare_main("--models", "TAGConv", "--gnn_kwargs", '{"K": 3}') == 2  # refused without --overwrite


@pytest.mark.parametrize("args,message", [
    (["--models", "bigram,GATv3Conv"], "error: unknown model 'GATv3Conv' in --models; did you mean GATv2Conv? "
                                       "choose bigram, gpt, all-layers or a PyG convolution such as GATConv or "
                                       "GATv2Conv (python pyg-gpt.py --list_layers shows all)\n"),
    (["--models", "gpt,Bigram"], "error: unknown model 'Bigram' in --models; did you mean bigram? "),
    (["--models", " , "], "error: --models is empty"),
    (["--frobnicate", "3"], "error: unknown flag --frobnicate"),
    (["--out_dir", "x"], "error: --out_dir is not passed through compare.py"),
    (["--resume"], "error: --resume is not passed through compare.py"),
    (["--wandb_log", "--wandb_run_name", "x"], "error: --wandb_run_name is not passed through compare.py, which picks "
                                               "each run's layer, directory and W&B run name"),
    (["--wandb_run", "x"], "error: a training flag abbreviates --out_dir, --gat_version, --resume or --wandb_run_name"),
    (["--n_head", "3"], "error: n_embd 16 is not divisible by n_head 3"),
    (["--jobs", "0"], "error: --jobs must be a positive integer, got 0"),
])
def test_bad_input_gives_one_line_error_and_trains_nothing(args, message, trainings, tmp_path, capsys):
    assert compare_main(*args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message)
    assert trainings == [] and list(tmp_path.iterdir()) == [tmp_path / "tiny.txt"]


def test_two_jobs_at_once_give_the_metrics_and_samples_of_one_at_a_time(trainings, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("gnngpt.sampling.SAMPLE_LENGTH", 500)  # the length the child processes write
    names = ["bigram", "gpt"]
    with one_thread():  # the children must train on this process's thread count, not on every core as they would
        assert compare_main("--models", "bigram,gpt", "--runs", "one") == 0
        trainings.clear()
        capsys.readouterr()
        assert compare_main("--models", "bigram,gpt", "--runs", "two", "--jobs", "2") == 0
    assert trainings == []  # the training scripts ran in child processes
    out = capsys.readouterr().out
    for name in names:
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        assert [(r["step"], r["train_loss"], r["val_loss"]) for r in read_metrics(two)] == \
            [(r["step"], r["train_loss"], r["val_loss"]) for r in read_metrics(one)]
        assert json.loads((two / "config.json").read_text())["machine"].endswith(" CPU, 1 torch thread")
        assert (two / "sample.txt").read_text() == (one / "sample.txt").read_text()
        assert f"step 4: train loss {read_metrics(two)[-1]['train_loss']:.4f}" in (two / "train.log").read_text()
        status = rf"^{name} +done +step 4/4 +val loss {read_metrics(two)[-1]['val_loss']:.4f} "
        assert re.search(status, out, re.MULTILINE), out
    assert [row[0] for row in table_rows((tmp_path / "two" / "results.md").read_text())] == names
    assert not (tmp_path / "plots").exists() and not (tmp_path / "model_outputs").exists()
    assert compare_main("--models", "bigram,gpt", "--runs", "two", "--jobs", "2") == 0
    assert capsys.readouterr().out.startswith("bigram: reusing the finished run in two/bigram\n"
                                              "gpt: reusing the finished run in two/gpt\n")


def test_script_fails_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "compare.py"), "--models", "bigram,nope"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: unknown model 'nope' in --models")
    assert list(tmp_path.iterdir()) == []
