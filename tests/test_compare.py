import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import torch

import compare
import evaluate
from conftest import ALLOCATION_ERROR, allocation_fails, t_interval, table_rows, tensorboard_scalars, wandb_runs
from gnngpt import cli, data, guard, report, results, rundir, runner, tuning
from gnngpt.config import PRESETS
from gnngpt.data import BatchSampler
from gnngpt.errors import UsageError
from gnngpt.guard import one_thread
from gnngpt.rundir import read_metrics
from gnngpt.stats import Difference

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


def test_a_run_removed_while_the_comparison_runs_is_a_failed_run(monkeypatch, in_tmp_path, tiny_text_file, capsys):
    real_main = cli.main

    def train_then_remove_the_first(script, argv):
        code = real_main(script, argv)
        if script.filename == "gpt.py":
            shutil.rmtree(in_tmp_path / "runs" / "bigram_s1337")
        return code

    monkeypatch.setattr(cli, "main", train_then_remove_the_first)
    assert compare_main("--models", "bigram,gpt") == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == [f"error: bigram_s1337: {Path('runs/bigram_s1337')} no longer holds its run's config.json "
                        f"(removed or damaged while the comparison ran)",
                        "error: training failed for bigram_s1337 (see the errors above); run compare.py again to "
                        "retry them: finished runs are reused"]
    assert (in_tmp_path / "plots" / "model_outputs" / "gpt.txt").is_file()  # the other run is reported


def compare_main(*args):
    """compare.py on tiny models, its tables and figures in plots/ as the shipped ones are (a later --out wins)."""
    return compare.main(["--data", "tiny.txt", *TINY, "--out", "plots", *args])


def test_a_comparison_run_again_shares_the_cores_among_all_its_runs_not_only_those_left(trainings, tmp_path,
                                                                                       monkeypatch):
    assert compare_main("--models", "bigram,gpt", "--out", "one") == 0
    shutil.rmtree(tmp_path / "runs" / "gpt_s1337")
    planned = []
    monkeypatch.setattr(runner, "train_in_processes",
                        lambda runs, states, at_once, count: planned.append((len(runs), at_once, count))
                        or runner.train_here(runs, states))
    assert compare_main("--models", "bigram,gpt", "--out", "one", "--jobs", "2") == 0
    assert planned == [(1, 2, 2)]  # gpt alone left: one thread of two cores, as when both trained


def test_a_run_that_is_not_sampled_for_the_report_gets_its_missing_sample_back_too(trainings, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setattr("gnngpt.sampling.SAMPLE_LENGTH", 20)
    assert compare_main("--models", "gpt", "--seeds", "2", "--out", "one") == 0
    sample = tmp_path / "runs" / "gpt_s1338" / "sample.txt"  # the second seed's: the report copies the first's
    trained = sample.read_text()
    sample.unlink()  # as a stop after the run's last step leaves it
    assert compare_main("--models", "gpt", "--seeds", "2", "--out", "one") == 0
    assert sample.read_text() == trained


def test_a_comparison_run_again_removes_what_a_killed_one_left_of_the_files_it_wrote(trainings, tmp_path):
    assert compare_main("--models", "gpt", "--out", "one") == 0
    run, out = tmp_path / "runs" / "gpt_s1337", tmp_path / "one"
    left = [out / ".results.md.k1ll3d_x.tmp", out / ".val_loss.png.0123456789abcdef.old",
            out / "model_outputs" / ".gpt.txt.k1ll3d_x.tmp", run / ".sample.txt.k1ll3d_x.tmp",
            run / ".eval.json.k1ll3d_x.tmp"]
    kept = [out / ".notes.txt.k1ll3d_x.tmp", run / ".train.log.k1ll3d_x.tmp"]  # no file that they write
    for path in left + kept:
        path.write_text("cut short")
    assert compare_main("--models", "gpt", "--out", "one", "--report_only") == 0
    assert [path.exists() for path in left] == [False, False, False, True, True]  # a report only reads the runs
    assert compare_main("--models", "gpt", "--out", "one") == 0
    assert not any(path.exists() for path in left) and all(path.exists() for path in kept)


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
        run = tmp_path / "runs" / f"{row[0]}_s1337"
        config = json.loads((run / "config.json").read_text())
        exact = json.loads((run / "eval.json").read_text())
        assert row[1:3] == [f"{exact['val_loss']:.4f} (1)", f"{exact['val_bpc']:.4f} (1)"]
        assert row[3] == f"{config['parameters']:,}"
        assert row[6] == "cpu" and row[7] == "cpu" and row[8] == config["machine"]
        assert len((tmp_path / "plots" / "model_outputs" / f"{row[0]}.txt").read_text()) == 21
    assert "One seed per configuration: no deviation or interval can be computed" in results
    assert "`plots/model_outputs/GATConv.txt` (seed 1337)" in results
    assert f"preset cpu, {config['machine']}" in results
    assert "python compare.py --data tiny.txt --max_iters 4" in results

    (tmp_path / "plots" / "model_outputs" / "bigram.txt").unlink()
    checkpoint = (tmp_path / "runs" / "GATConv_s1337" / "ckpt.pt").read_bytes()
    (tmp_path / "plots" / "results.md").unlink()
    trainings.clear()
    assert compare_main("--models", "bigram,GATConv") == 0
    assert trainings == []
    assert (tmp_path / "runs" / "GATConv_s1337" / "ckpt.pt").read_bytes() == checkpoint
    assert len((tmp_path / "plots" / "model_outputs" / "bigram.txt").read_text()) == 21  # again, from the checkpoint
    assert table_rows((tmp_path / "plots" / "results.md").read_text()) == rows


def test_paper_runs_show_the_published_losses_and_every_setting_that_is_not_the_presets(trainings, tmp_path):
    assert compare_main("--models", "gpt,GCNConv", "--preset", "paper", "--out", "plots/paper") == 0
    results = (tmp_path / "plots" / "paper" / "results.md").read_text()
    assert "Samples: `plots/paper/model_outputs/gpt.txt` (seed 1337), `plots/paper/model_outputs/GCNConv.txt` " \
           "(seed 1337)." in results  # not the shipped ones: the models are not the published size
    assert not (tmp_path / "model_outputs").exists()
    assert "| model | val loss (nats) | bits per character | published | Δ vs gpt (nats) [95% CI] |" in results
    assert [(row[0], row[3]) for row in table_rows(results)] == [("gpt", "1.50"), ("GCNConv", "-")]
    assert "published: the original's validation loss after 5000 steps of the paper preset" in results
    assert "- eval_interval 2 instead of 50 (all models)\n- eval_iters 2 instead of 200 (all models)\n" in results
    assert "dropout" not in results  # TINY keeps the preset's


def test_runs_with_other_settings_are_refused_or_replaced_with_overwrite(trainings, tmp_path, capsys):
    assert compare_main("--models", "bigram,gpt") == 0
    trainings.clear()
    capsys.readouterr()
    assert compare_main("--models", "bigram,gpt", "--n_embd", "8") == 2
    assert capsys.readouterr().err == ("error: runs/gpt_s1337 already hold runs that these settings can neither "
                                       "reuse nor resume (other settings, or no checkpoint to resume from; "
                                       "runs/gpt_s1337: n_embd was 16, now 8); pass --overwrite to replace them or "
                                       "--runs DIR to train elsewhere\n")
    assert trainings == []
    assert compare_main("--models", "bigram,gpt", "--n_embd", "8", "--overwrite") == 0  # bigram has no width
    assert [script for script, _ in trainings] == ["gpt.py"]
    assert json.loads((tmp_path / "runs" / "gpt_s1337" / "config.json").read_text())["settings"]["n_embd"] == 8
    trainings.clear()
    assert compare_main("--models", "bigram,gpt", "--n_embd", "8", "--seed", "3") == 0  # runs of their own
    assert [script for script, _ in trainings] == ["bigram.py", "gpt.py"]
    assert (tmp_path / "runs" / "gpt_s3").is_dir()


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
    assert [m["step"] for m in read_metrics(tmp_path / "runs" / "gpt_s1337")] == [0, 2, 4]
    assert table_rows((tmp_path / "plots" / "results.md").read_text())[0][0] == "gpt"


def test_a_run_that_stopped_before_its_first_checkpoint_trains_again(trainings, tmp_path, monkeypatch, capsys):
    def out_of_memory(sampler, split):
        raise RuntimeError("out of memory")  # in the evaluation before the first step, which checkpoints

    with monkeypatch.context() as m:
        m.setattr(BatchSampler, "get", out_of_memory)
        assert compare_main("--models", "gpt") == 1
    run = tmp_path / "runs" / "gpt_s1337"
    assert not rundir.holds_run(run)  # a failed training leaves no run file before its first checkpoint
    assert compare_main("--models", "gpt") == 0
    assert "--overwrite" not in trainings[-1][1]

    for path in run.iterdir():  # as a training killed in that evaluation leaves it: config.json, metrics' header
        if path.name not in ("config.json", "metrics.csv", rundir.LOCK_FILE):
            path.unlink()
    (run / "metrics.csv").write_text((run / "metrics.csv").read_text().splitlines(keepends=True)[0])
    assert compare_main("--models", "gpt") == 0
    assert "--overwrite" in trainings[-1][1]
    assert [m["step"] for m in read_metrics(run)] == [0, 2, 4]

    (run / "ckpt.pt").unlink()  # a run that trained, without its checkpoint: replaced only when told
    metrics = (run / "metrics.csv").read_text().splitlines(keepends=True)
    (run / "metrics.csv").write_text("".join(metrics[:3]))  # its rows of steps 0 and 2
    capsys.readouterr()
    assert compare_main("--models", "gpt") == 2
    assert "error: runs/gpt_s1337 already hold runs that these settings can neither reuse nor resume" in \
        capsys.readouterr().err
    assert (run / "metrics.csv").read_text() == "".join(metrics[:3])


def test_only_a_comparison_at_the_paper_presets_settings_writes_the_shipped_samples(trainings, tmp_path,
                                                                                   monkeypatch):
    tiny = {"max_iters": 4, "batch_size": 4, "block_size": 16, "n_embd": 16, "n_head": 2, "n_layer": 1}
    monkeypatch.setitem(PRESETS, "paper", {arch: {**settings, **{k: v for k, v in tiny.items() if k in settings}}
                                           for arch, settings in PRESETS["paper"].items()})  # TINY's sizes
    monkeypatch.setattr(rundir, "PUBLISHED_REPORT", tmp_path / "plots" / "paper")  # as if this were the repository
    monkeypatch.setattr(rundir, "SHIPPED_SAMPLES", tmp_path / "model_outputs")
    assert compare_main("--models", "bigram,gpt", "--preset", "paper", "--out", "plots/paper") == 0
    results = (tmp_path / "plots" / "paper" / "results.md").read_text()
    assert "Samples: `model_outputs/bigram.txt` (seed 1337), `model_outputs/gpt.txt` (seed 1337)." in results
    shipped = {name: (tmp_path / "model_outputs" / f"{name}.txt").read_text() for name in ("bigram", "gpt")}
    for name, text in shipped.items():
        assert text == (tmp_path / "runs" / f"{name}_s1337" / "sample.txt").read_text()

    assert compare_main("--models", "bigram,gpt", "--preset", "paper", "--out", "plots/paper", "--overwrite",
                        "--dropout", "0.1") == 0  # one setting not the preset's: samples of its own
    paper = tmp_path / "plots" / "paper"
    assert "Samples: `plots/paper/model_outputs/bigram.txt`" in (paper / "results.md").read_text()
    assert (paper / "model_outputs" / "gpt.txt").read_text() == \
        (tmp_path / "runs" / "gpt_s1337" / "sample.txt").read_text()
    assert {name: (tmp_path / "model_outputs" / f"{name}.txt").read_text() for name in shipped} == shipped

    assert compare_main("--models", "bigram,gpt", "--preset", "paper", "--out", "plots/paper",
                        "--learning_rate", "gpt=3e-4,1e-7", "--learning_rate", "bigram=1e-2,1e-7") == 0  # presets win
    line = next(s for s in (paper / "results.md").read_text().splitlines() if s.startswith("Samples: "))
    written = re.findall(r"`([^`]+)`", line)
    assert [Path(w).parent.as_posix() for w in written] == ["plots/paper/model_outputs"] * 2
    assert all((tmp_path / w).is_file() for w in written)
    assert {name: (tmp_path / "model_outputs" / f"{name}.txt").read_text() for name in shipped} == shipped

    monkeypatch.chdir(tmp_path / "plots")  # from a folder of the repository, plots/paper is another directory
    assert compare.main(["--data", str(tmp_path / "tiny.txt"), *TINY, "--models", "bigram", "--preset", "paper",
                         "--runs", "elsewhere", "--out", "plots/paper"]) == 0
    assert (tmp_path / "plots" / "plots" / "paper" / "model_outputs" / "bigram.txt").is_file()
    assert not (tmp_path / "plots" / "model_outputs").exists()
    assert {name: (tmp_path / "model_outputs" / f"{name}.txt").read_text() for name in shipped} == shipped


@pytest.mark.parametrize("made_by", ["--runs", "--runs=", None], ids=["--runs DIR", "--runs=DIR", "the default"])
def test_a_report_of_other_runs_is_never_written_over(made_by, trainings, tmp_path, capsys):
    mine = [] if made_by is None else ([made_by + "mine"] if made_by.endswith("=") else [made_by, "mine"])
    runs = "runs" if made_by is None else "mine"
    assert compare_main("--models", "bigram", *mine, "--out", "shipped") == 0
    before = {p: p.read_bytes() for p in (tmp_path / "shipped").rglob("*") if p.is_file()}
    trainings.clear()
    capsys.readouterr()
    assert compare_main("--models", "bigram", "--runs", "elsewhere", "--out", "shipped") == 2
    assert capsys.readouterr().err == (f"error: --out shipped holds results.md, the report of the runs in {runs}; pass "
                                       f"--runs {runs} to make it again, or choose another --out\n")
    assert trainings == [] and not (tmp_path / "elsewhere").exists()
    assert {p: p.read_bytes() for p in (tmp_path / "shipped").rglob("*") if p.is_file()} == before
    assert compare_main("--models", "bigram", "--runs", f"./{runs}", "--out", "shipped", "--report_only") == 0
    assert compare_main("--models", "bigram", "--runs", "elsewhere", "--runs", runs, "--out", "shipped",
                        "--report_only") == 0  # the last --runs counts, as argparse reads it
    (tmp_path / "sub").mkdir()
    os.chdir(tmp_path / "sub")  # the same runs, from another directory (the fixture's tmp_path is the cwd again)
    report.check_report_owner("../shipped", f"../{runs}", [])
    with pytest.raises(UsageError, match=f"^--out ../shipped holds results.md, the report of the runs in {runs}; "):
        report.check_report_owner("../shipped", runs, [])


def test_a_shipped_report_or_run_is_written_over_by_its_own_command_alone(trainings, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # where the shipped command runs
    paper = Path("plots/paper")
    before = {p: p.read_bytes() for p in paper.rglob("*") if p.is_file()}
    made_by = (paper / "results.md").read_text().split("`")[1]
    argv = shlex.split(made_by)[2:]
    fewer = [a.replace("bigram,gpt,GATConv,GATv2Conv", "bigram,gpt") for a in argv]
    assert fewer != argv and compare.main([*fewer, "--report_only"]) == 2  # its runs, but fewer of them
    assert capsys.readouterr().err == (f"error: --out {paper} holds results.md, a report in the repository's plots/, "
                                       f"where it keeps the reports it ships, which only the command that made it "
                                       f"writes over: {made_by} (from the repository's root; add --report_only to "
                                       f"rebuild it from its runs); choose another --out for other settings\n")
    shorter = ["--models", "gpt", "--preset", "paper", "--max_iters", "10", "--runs", str(paper / "runs"), "--out",
               "mine", "--overwrite"]
    assert compare.main(shorter) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {paper / 'runs' / 'gpt_s1337'} holds a run in the repository's plots/, where it "
                          f"keeps the runs it ships, and these settings can neither reuse nor resume it (")
    assert err.endswith("); choose another --runs\n")
    assert "max_iters was 5000, now 10" in err
    assert trainings == [] and not Path("mine").exists()
    assert {p: p.read_bytes() for p in paper.rglob("*") if p.is_file()} == before
    for given in (argv, [*argv, "--report_only"]):  # the shipped command passes, with --report_only or without
        report.check_report_owner(paper, "plots/paper/runs", given)


def test_a_stopped_comparison_in_plots_resumes_but_replaces_no_run_there(trainings, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rundir, "SHIPPED_REPORTS", tmp_path / "plots")  # as if this were the repository's
    mine = ["--models", "gpt", "--runs", "plots/mine/runs", "--out", "plots/mine"]
    real_get = BatchSampler.get
    batches = []

    def interrupt_at_step_3(sampler, split):
        batches.append(split)
        if batches.count("train") == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the third step, after the step-2 checkpoint
        return real_get(sampler, split)

    with monkeypatch.context() as m:
        m.setattr(BatchSampler, "get", interrupt_at_step_3)
        assert compare_main(*mine) == 130
    assert compare_main(*mine) == 0  # the same command again resumes it, as compare.py says
    assert "--resume" in trainings[-1][1]
    capsys.readouterr()
    assert compare_main(*mine, "--eval_iters", "3", "--overwrite", "--out", "elsewhere") == 2
    assert capsys.readouterr().err == ("error: plots/mine/runs/gpt_s1337 holds a run in the repository's plots/, where "
                                       "it keeps the runs it ships, and these settings can neither reuse nor resume "
                                       "it (eval_iters was 2, now 3); choose another --runs\n")


@pytest.mark.parametrize("file", ["", "results.md"])  # the first file of the report written, and its table
def test_sigterm_while_the_report_is_written_stops_as_ctrl_c_does_and_leaves_no_temporary_file(file, trainings,
                                                                                                 tmp_path,
                                                                                                 monkeypatch, capsys):
    assert compare_main("--models", "bigram", "--out", "out") == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    real_fsync = os.fsync

    def terminated_while_writing(fd):  # SIGTERM as the file's temporary copy is about to be renamed into place
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path / "out" / f".{file}")):
            os.kill(os.getpid(), signal.SIGTERM)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", terminated_while_writing)
    assert compare_main("--models", "bigram", "--out", "out", "--report_only") == 143
    assert capsys.readouterr().err.endswith("\rinterrupted; run the same command again to go on: finished runs are "
                                            "reused and stopped ones resume\n")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before  # no .*.tmp


def test_runs_in_plots_without_a_snapshot_are_trained_again_in_another_runs(trainings, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setattr(rundir, "SHIPPED_REPORTS", tmp_path / "plots")  # as if this were the repository's
    mine = ["--models", "bigram", "--runs", "plots/mine/runs", "--out", "plots/mine"]
    assert compare_main(*mine) == 0
    capsys.readouterr()
    assert compare_main(*mine, "--report_only", "--report_step", "2", "--out", "at2") == 2
    assert capsys.readouterr().err == ("error: --report_only needs every run finished with its eval_step2.json, and "
                                       "plots/mine/runs/bigram_s1337 (no eval_step2.json) is not; train them with "
                                       "--exact_at 2 among the training flags in another --runs (a finished run "
                                       "keeps no earlier weights)\n")


def test_a_report_in_plots_goes_beside_its_runs_not_among_them(trainings, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rundir, "SHIPPED_REPORTS", tmp_path / "plots")  # as if this were the repository's
    for flag, out in (("--runs", []), ("--out", ["--out", "plots/mine/runs/bigram_s1337"])):  # --out is --runs'
        assert compare.main(["--data", "tiny.txt", *TINY, "--models", "bigram", "--runs", "plots/mine/runs", *out]) == 2
        assert capsys.readouterr().err == (f"error: {flag} {out[-1] if out else 'plots/mine/runs'} would put the "
                                           f"report among the runs of plots/mine/runs in the repository's plots/, "
                                           f"where each report sits beside the folder of its runs; give --out "
                                           f"another directory, such as plots/mine\n")
    assert trainings == [] and not (tmp_path / "plots").exists()
    assert compare_main("--models", "bigram", "--runs", "plots/mine/runs", "--out", "plots/mine") == 0


def test_a_finished_run_of_another_text_is_not_reused(trainings, tmp_path, capsys):
    assert compare_main("--models", "bigram") == 0
    run = tmp_path / "runs" / "bigram_s1337"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    text = (tmp_path / "tiny.txt").read_text()
    (tmp_path / "tiny.txt").write_text(text[::-1])  # the same characters and length: another text all the same
    capsys.readouterr()
    assert compare_main("--models", "bigram") == 2
    was, now = (hashlib.sha256(t.encode()).hexdigest() for t in (text, text[::-1]))
    assert capsys.readouterr().err == (f"error: runs/bigram_s1337 already hold runs that these settings can neither "
                                       f"reuse nor resume (other settings, or no checkpoint to resume from; "
                                       f"runs/bigram_s1337: data_sha256 was {was}, now {now}); pass --overwrite to "
                                       f"replace them or --runs DIR to train elsewhere\n")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before and len(trainings) == 1
    config = json.loads((run / "config.json").read_text())
    del config["data_sha256"]  # as a run from before trainings recorded it
    (run / "config.json").write_text(json.dumps(config))
    assert compare_main("--models", "bigram", "--report_only") == 0


def test_a_missing_default_text_is_downloaded_before_finished_runs_are_matched_to_it(trainings, tmp_path,
                                                                                     monkeypatch, capsys):
    mine = (tmp_path / "tiny.txt").read_text()
    (tmp_path / "input.txt").write_text(mine)  # a text of one's own in the default file
    assert compare.main([*TINY, "--models", "bigram"]) == 0
    (tmp_path / "input.txt").unlink()
    downloaded = mine[::-1]
    monkeypatch.setattr(data, "download", lambda url, dest, sha256, **kwargs: Path(dest).write_text(downloaded))
    capsys.readouterr()
    assert compare.main([*TINY, "--models", "bigram,gpt"]) == 2
    was, now = (hashlib.sha256(t.encode()).hexdigest() for t in (mine, downloaded))
    assert f"runs/bigram_s1337: data_sha256 was {was}, now {now}); pass --overwrite" in capsys.readouterr().err
    assert len(trainings) == 1  # gpt did not train beside a bigram of another text


def test_a_results_md_not_made_by_compare_py_is_not_a_report_to_protect(trainings, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "results.md").write_text("My notes: see `python train.py --runs other`\n")
    assert compare_main("--models", "bigram", "--out", "notes") == 0
    assert (tmp_path / "notes" / "results.md").read_text().startswith("# Results\n\nMade by `python compare.py ")


def test_a_finished_run_is_reused_without_its_checkpoint_only_with_its_exact_loss_and_sample(trainings, tmp_path,
                                                                                             capsys):
    assert compare_main("--models", "bigram") == 0
    run = tmp_path / "runs" / "bigram_s1337"
    (run / "ckpt.pt").unlink()  # as a committed study keeps its runs
    trainings.clear()
    assert compare_main("--models", "bigram") == 0 and trainings == []
    for damage in (lambda: (run / "eval.json").write_text("garbage"), lambda: (run / "eval.json").unlink()):
        damage()  # nothing left to score it with: refused before anything trains, not reused
        capsys.readouterr()
        assert compare_main("--models", "bigram,gpt") == 2 and trainings == []
        assert capsys.readouterr().err.startswith("error: runs/bigram_s1337 already hold runs that these settings can "
                                                  "neither reuse nor resume")
    (run / "eval.json").write_text("garbage")
    assert compare_main("--models", "bigram", "--report_only") == 2
    assert capsys.readouterr().err.startswith("error: --report_only needs every run finished with its eval.json, and "
                                              "runs/bigram_s1337 (eval.json cannot be read (Expecting value: line 1 "
                                              "column 1 (char 0)), and no checkpoint to go on from) is not;")
    assert compare_main("--models", "bigram", "--overwrite") == 0 and len(trainings) == 1


def test_a_run_whose_metrics_csv_or_checkpoint_is_damaged_is_repaired_or_replaced(trainings, tmp_path, capsys):
    assert compare_main("--models", "bigram") == 0
    run = tmp_path / "runs" / "bigram_s1337"
    metrics = (run / "metrics.csv").read_text()
    (run / "metrics.csv").write_text(metrics[:60])  # cut short: the run looks unfinished
    assert compare_main("--models", "bigram") == 0  # resumed from its checkpoint, which holds every row
    assert (run / "metrics.csv").read_text() == metrics and "--resume" in trainings[-1][1]
    (run / "metrics.csv").write_text(metrics[:60])
    (run / "ckpt.pt").write_bytes((run / "ckpt.pt").read_bytes()[:1000])  # and nothing to resume from
    trainings.clear()
    capsys.readouterr()
    assert compare_main("--models", "bigram") == 2 and trainings == []
    assert capsys.readouterr().err.startswith("error: runs/bigram_s1337 already hold runs that these settings can "
                                              "neither reuse nor resume")
    assert compare_main("--models", "bigram", "--report_only") == 2
    assert capsys.readouterr().err == ("error: --report_only needs every run finished with its eval.json, and "
                                       "runs/bigram_s1337 (not finished, and a checkpoint that cannot be read to go "
                                       "on from) is not; run the same command without --report_only, with "
                                       "--overwrite for those that can neither be reused nor resumed\n")
    assert compare_main("--models", "bigram", "--overwrite") == 0 and "--overwrite" in trainings[-1][1]


def test_all_layers_trains_every_working_layer_and_writes_a_leaderboard(trainings, tiny_text_file, tmp_path,
                                                                         monkeypatch):
    records = [SimpleNamespace(name="GATConv", works=True, reason=""),
               SimpleNamespace(name="DenseGCNConv", works=False, reason="dense layer: takes a (B, N, N) adjacency"),
               SimpleNamespace(name="GATv2Conv", works=True, reason="")]
    monkeypatch.setattr(guard, "layer_support", lambda: records, raising=False)
    assert compare_main("--models", "all-layers", "--out", "plots") == 0
    assert [argv[argv.index("--gat_version") + 1] for _, argv in trainings] == ["GATConv", "GATv2Conv"]
    assert not (tmp_path / "model_outputs").exists()  # the shipped samples are the comparison's, not the board's
    assert (tmp_path / "plots" / "model_outputs" / "GATConv.txt").read_text() == \
        (tmp_path / "runs" / "GATConv_s1337" / "sample.txt").read_text()
    (tmp_path / "plots").rename(tmp_path / "board")

    image = matplotlib.image.imread(tmp_path / "board" / "leaderboard.png")
    assert image.ndim == 3 and image.shape[0] > 50
    board = (tmp_path / "board" / "leaderboard.md").read_text()
    rows = table_rows(board)
    exact = {name: json.loads((tmp_path / "runs" / f"{name}_s1337" / "eval.json").read_text())["val_loss"]
             for name in ("GATConv", "GATv2Conv")}
    assert [row[1] for row in rows] == sorted(exact, key=exact.get)
    assert [row[0] for row in rows] == ["1", "2"]
    assert [row[2] for row in rows] == [f"{loss:.4f} (1)" for loss in sorted(exact.values())]
    assert "- DenseGCNConv: dense layer: takes a (B, N, N) adjacency" in board
    assert not (tmp_path / "board" / "val_loss.png").exists()  # the four-model comparison is left alone
    assert "runs trained at once" not in board
    for config_file in (tmp_path / "runs").glob("*/config.json"):  # runs from before config.json recorded it
        config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items()
                                           if k != "runs_at_once"}))
    assert compare_main("--models", "all-layers", "--out", "board", "--jobs", "2", "--report_only") == 0
    assert "Up to 2 runs trained at once (--jobs 2)" in (tmp_path / "board" / "leaderboard.md").read_text()
    assert "more than one machine" not in (tmp_path / "board" / "leaderboard.md").read_text()
    config_file = tmp_path / "runs" / "GATv2Conv_s1337" / "config.json"
    config = json.loads(config_file.read_text())
    machine = config["machine"]
    config.update(runs_at_once=4, machine="NVIDIA H200", versions={**config["versions"], "torch": "2.3.0"})
    config_file.write_text(json.dumps(config))
    assert compare_main("--models", "all-layers", "--out", "board", "--jobs", "2", "--report_only") == 0
    board = (tmp_path / "board" / "leaderboard.md").read_text()
    assert f"{machine}; NVIDIA H200" in board.splitlines()[2]  # the title names every run's machine
    assert (f"The runs were measured on more than one machine or torch version ({machine}, torch {torch.__version__}"
            f"; NVIDIA H200, torch 2.3.0): compare tokens/s and times only between runs measured alike.") in board
    assert "Up to 4 runs trained at once (--jobs 2; 4 as the others record it)" in board


def test_a_reports_title_names_the_machine_of_every_run_not_only_of_each_configurations_first_seed():
    from gnngpt.report import describe

    configs = [{"preset": "cpu", "machine": "A", "runs": [{"machine": "A"}, {"machine": "B"}]},
               {"preset": "cpu", "machine": "A", "runs": [{"machine": "A"}]}]
    assert describe(configs) == "preset cpu, A; B"


def test_failed_trainings_are_reported_and_exit_1(trainings, tiny_text_file, tmp_path, monkeypatch, capsys):
    def refuse(*args):
        raise UsageError("the batches cannot be drawn; fix it")  # a refusal that only the training itself can make

    monkeypatch.setattr(BatchSampler, "__init__", refuse)
    assert compare_main("--models", "bigram,gpt") == 1
    err = capsys.readouterr().err
    assert err.count("error: the batches cannot be drawn; fix it\n") == 2
    assert err.endswith("error: training failed for bigram_s1337, gpt_s1337 (see the errors above); run compare.py "
                        "again to retry them: finished runs are reused\n")
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
    assert "error: gpt_s1337 failed: out of memory\n" in err and "more details" not in err
    assert [row[0] for row in table_rows((tmp_path / "plots" / "results.md").read_text())] == ["bigram"]


@pytest.mark.parametrize("args,report,failed", [
    ([], "results.md", ["gpt_s1337"]),  # gpt is the baseline unless told
    (["--learning_rate", "1e-3,3e-2"], "results.md", ["gpt_lr0.001_s1337", "gpt_lr0.03_s1337"]),
    (["--graphs", "full,window:2"], "graphs.md", ["gpt_s1337", "gpt_window-2_s1337"]),
    (["--models", "gpt,bigram,all-layers"], "leaderboard.md", ["gpt_s1337"]),
])
def test_every_report_names_the_runs_whose_training_failed(args, report, failed, trainings, tmp_path, monkeypatch):
    monkeypatch.setattr(guard, "layer_support", lambda: [SimpleNamespace(name="GATConv", works=True, reason="")],
                        raising=False)
    real_main = cli.main
    monkeypatch.setattr(cli, "main", lambda script, argv: 1 if script.filename == "gpt.py" else real_main(script, argv))
    assert compare_main("--models", "gpt,bigram", *args) == 1
    text = (tmp_path / "plots" / report).read_text()
    assert not any(row[0].startswith("gpt") or row[1:2] == ["gpt"] for row in table_rows(text))
    assert (f"Not reported, their training failed: {', '.join(f'{name} (exit code 1)' for name in failed)}; the same "
            f"command trains them again and reuses the finished runs.") in text
    ranked = report == "leaderboard.md"  # a leaderboard has no baseline
    assert ("The baseline gpt is among them, so no difference from it is shown." in text) != ranked


def test_tracking_flags_pass_through_and_each_model_is_one_tracked_run(offline_wandb, trainings, tmp_path):
    pytest.importorskip("tensorboard")
    assert compare_main("--models", "bigram,gpt", "--wandb_log", "--wandb_project", "comparison", "--tensorboard") == 0
    flags = ["--wandb_log", "--wandb_project", "comparison", "--tensorboard"]
    assert all(argv[argv.index("--wandb_log"):][:4] == flags for _, argv in trainings)
    for name in ("bigram", "gpt"):
        run = tmp_path / "runs" / f"{name}_s1337"
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


def test_a_comparison_never_writes_its_samples_over_the_shipped_ones(trainings, tmp_path, capsys):
    shipped = ROOT / "model_outputs"
    for flags, flag in ((["--out", str(ROOT)], "--out"), (["--runs", str(ROOT), "--out", str(ROOT)], "--out"),
                        (["--runs", f"{ROOT}/model_outputs/.."], "--runs")):
        assert compare.main(["--data", "tiny.txt", *TINY, "--models", "bigram", *flags]) == 2
        out = Path(flags[flags.index(flag) + 1])
        assert capsys.readouterr().err == (f"error: {flag} {out} would put the samples over {shipped}, the ones this "
                                           f"repository ships (only the published comparison writes them: --out "
                                           f"plots/paper at the paper preset); choose another {flag}\n")
    assert trainings == []


@pytest.mark.parametrize("out,problem", [
    ("model_outputs", "is a folder of samples or runs that this repository ships"),
    ("plots/tuned/model_outputs", "is a folder of samples or runs that this repository ships"),
    ("plots/paper/runs", "is a folder of samples or runs that this repository ships"),
    ("plots/paper/runs/gpt_s1337", "holds a run, which the report would be mixed into"),
])
def test_a_report_goes_neither_into_a_run_nor_into_a_shipped_folder_of_samples_or_runs(out, problem, trainings,
                                                                                       capsys):
    shipped = {path: sorted(path.rglob("*")) for path in (ROOT / "model_outputs", ROOT / "plots")}
    assert compare_main("--models", "bigram", "--out", str(ROOT / out)) == 2
    assert capsys.readouterr().err == (f"error: --out {ROOT / out} {problem}; give --out a directory of its own\n")
    assert trainings == [] and {path: sorted(path.rglob("*")) for path in shipped} == shipped


def test_an_out_whose_samples_folder_is_a_file_is_refused_before_anything_trains(trainings, tmp_path, capsys):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "model_outputs").write_text("a file")
    assert compare_main("--models", "bigram", "--out", "report") == 2
    assert capsys.readouterr().err == ("error: --out report/model_outputs is a file, not a directory; choose another "
                                       "--out\n")
    assert trainings == [] and not (tmp_path / "runs").exists()


def test_a_report_goes_not_into_one_of_its_runs(trainings, tmp_path, capsys):
    assert compare_main("--models", "bigram") == 0
    run = tmp_path / "runs" / "bigram_s1337"
    capsys.readouterr()
    assert compare_main("--models", "bigram", "--out", str(run), "--report_only") == 2
    assert capsys.readouterr().err == (f"error: --out {run} holds a run, which the report would be mixed into; give "
                                       f"--out a directory of its own\n")


@pytest.mark.parametrize("args,message", [
    (["--models", "bigram,GATv3Conv"], "error: unknown model 'GATv3Conv' in --models; did you mean GATv2Conv? "
                                       "choose bigram, gpt, all-layers or a PyG convolution such as GATConv or "
                                       "GATv2Conv (python pyg-gpt.py --list_layers shows all)\n"),
    (["--models", "gpt,Bigram"], "error: unknown model 'Bigram' in --models; did you mean bigram? "),
    (["--models", " , "], "error: --models ' , ' names nothing; give a comma-separated list such as "
                          "bigram,gpt,GATConv,GATv2Conv\n"),
    (["--frobnicate", "3"], "error: unknown flag --frobnicate"),
    (["--out_dir", "x"], "error: --out_dir is not passed through compare.py"),
    (["--resume"], "error: --resume is not passed through compare.py"),
    (["--wandb_log", "--wandb_run_name", "x"], "error: --wandb_run_name is not passed through compare.py, which picks "
                                               "each run's layer, directory and W&B run name"),
    (["--wandb_run", "x"], "error: --wandb_run_name is not passed through compare.py"),
    (["--see", "5"], "error: --see abbreviates --seed; write training flags in full\n"),  # else every run seed 5
    (["--res"], "error: --resume is not passed through compare.py"),
    (["--", "x"], "error: unknown flag --; see python compare.py --help"),
    (["--dat=other.txt"], "error: --dat abbreviates --data; write training flags in full\n"),
    (["--wandb", "x"], "error: --wandb abbreviates --wandb_log or --wandb_project; write training flags in full\n"),
    (["--n_layer", "1", "stray"], "error: unexpected argument 'stray' after --n_layer; see python compare.py --help\n"),
    (["--n_head", "3"], "error: n_embd 16 is not divisible by n_head 3"),
    (["--jobs", "0"], "error: --jobs must be a positive integer, got 0"),
    (["--seeds", "0"], "error: --seeds must be a positive integer, got 0"),
    (["--seed", "1,x"], "error: --seed '1,x' is not an integer or a comma-separated list of integers"),
    (["--seed", "1,2", "--seeds", "2"], "error: --seeds 2 and a list in --seed 1,2 exclude each other"),
    (["--seed", "1,2,1"], "error: --seed '1,2,1' names seed 1 twice; give each once\n"),
    (["--seed", "1,,2"], "error: --seed '1,,2' has an empty item; remove the extra comma\n"),
    (["--models", "gpt,,bigram"], "error: --models 'gpt,,bigram' has an empty item; remove the extra comma\n"),
    (["--models", "gpt,bigram,gpt"], "error: --models 'gpt,bigram,gpt' names gpt twice; give each once\n"),
    (["--models", "bigram", "--graphs", "full,full"], "error: --graphs and --pos place a token mixer, and --models "
                                                     "bigram has none; drop them, or add a model such as gpt\n"),
    (["--models", "bigram", "--pos", "rel"], "error: --graphs and --pos place a token mixer, and --models bigram has "
                                             "none"),
    (["--learning_rate", "gpt="], "error: --learning_rate 'gpt=' names nothing; give a comma-separated list such as "
                                  "5e-4,1e-3,2e-3\n"),
    (["--learning_rate", " =1e-3"], "error: --learning_rate ' =1e-3' names no model before =; give MODEL=RATE,... for "
                                    "one model, or the rates alone for every model\n"),
    (["--seed", ""], "error: --seed '' names nothing; give a comma-separated list such as 1337,1338,1339\n"),
    (["--learning_rate", "=1e-3"], "error: --learning_rate '=1e-3' names no model before =; give MODEL=RATE,... for "
                                   "one model, or the rates alone for every model\n"),
    (["--learning_rate", "gpt=1e-3,bigram=abc"], "error: --learning_rate 'gpt=1e-3,bigram=abc' gives the rates of "
                                                 "several models; repeat the flag, one model each, as in "
                                                 "--learning_rate gpt=1e-3 --learning_rate bigram=1e-2\n"),
    (["--seed", str(2**64)], f"error: --seed must be an integer from 0 to 2**63 - 1, got {2**64}\n"),
    (["--models", "gpt,GATConv", "--gnn_kwargs", '{"heads": 0}'], "error: GATConv cannot replace attention: "),
    (["--models", "bigram,gpt", "--block_size", "5000"], "error: --data has too little text for block_size 5000: "),
    (["--models", "bigram,gpt", "--baseline", ""], "error: --baseline '' is not in this comparison; "),
    (["--seed", str(2**63 - 1), "--seeds", "2"], f"error: --seed {2**63 - 1} and --seeds 2 go up to seed {2**63}, past "
                                                 f"2**63 - 1; choose a lower --seed\n"),
    (["--models", "bigram,gpt", "--baseline", "GATConv"], "error: --baseline 'GATConv' is not in this comparison; "
                                                          "choose one of bigram, gpt"),
    (["--learning_rate", "abc"], "error: --learning_rate abc: 'abc' is not a positive number; give rates as in "
                                 "5e-4,1e-3,2e-3, or MODEL=5e-4,1e-3 for one model\n"),
    (["--learning_rate", "1e-3,0"], "error: --learning_rate 1e-3,0: '0' is not a positive number"),
    (["--learning_rate", "-1"], "error: --learning_rate -1: '-1' is not a positive number"),
    (["--learning_rate", "1e-3,,2e-3"], "error: --learning_rate '1e-3,,2e-3' has an empty item; remove the extra "
                                        "comma\n"),
    (["--learning_rate", "gpt=nan"], "error: --learning_rate gpt=nan: 'nan' is not a positive number"),
    (["--learning_rate", "1e-3,0.001"], "error: --learning_rate '1e-3,0.001' names the rate 0.001 twice; give each "
                                        "once\n"),
    (["--learning_rate", "GCNConv=1e-3"], "error: --learning_rate GCNConv=1e-3: GCNConv is not in --models; name "
                                          "one of bigram, gpt, GATConv, GATv2Conv\n"),
    (["--learning_rate", "gpt=1e-3", "--learning_rate", "gpt=2e-3"], "error: --learning_rate gives the rates of gpt "
                                                                     "twice; give each once\n"),
    (["--learning_rate", "1e-3,2e-3", "--graphs", "full,window:4"], "error: several learning rates compare models on "
                                                                    "one graph with one kind of positions"),
    (["--report_step", "2"], "error: --report_step reports finished runs as they were at that step; add "
                             "--report_only"),
    (["--target_loss", "nan"], "error: --target_loss must be a positive number, got nan\n"),
    (["--target_loss", "inf"], "error: --target_loss must be a positive number, got inf\n"),
    (["--target_loss", "0"], "error: --target_loss must be a positive number, got 0.0\n"),
    (["--out", "/proc/x"], "error: --out /proc/x cannot be written (/proc: "),
    (["--runs", "/proc/x/runs"], "error: --runs /proc/x/runs cannot be written (/proc: "),
    (["--models", "gpt", "--learning_rate", "1e-3,0.0010000001"], "error: --learning_rate '1e-3,0.0010000001' names "
                                                                  "the rate 0.001 twice; give each once\n"),
    (["--report_only"], "error: --report_only needs every run finished with its eval.json, and "
                        "runs/bigram_s1337 (not there), runs/gpt_s1337 (not there), "
                        "runs/GATConv_s1337 (not there), runs/GATv2Conv_s1337 (not there) are not; run the "
                        "same command without --report_only"),
])
def test_bad_input_gives_one_line_error_and_trains_nothing(args, message, trainings, tmp_path, capsys):
    assert compare_main(*args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message)
    assert trainings == [] and list(tmp_path.iterdir()) == [tmp_path / "tiny.txt"]


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_file_where_a_run_goes_is_refused_before_anything_trains(jobs, trainings, tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "gpt_s1337").write_text("x")
    assert compare_main("--models", "bigram,gpt", "--jobs", jobs) == 2
    assert capsys.readouterr().err == ("error: runs/gpt_s1337 is a file where the run gpt_s1337 goes; move it away or "
                                       "choose another --runs\n")
    assert trainings == [] and [p.name for p in (tmp_path / "runs").iterdir()] == ["gpt_s1337"]


def test_two_jobs_at_once_give_the_metrics_and_samples_of_one_at_a_time(trainings, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("gnngpt.sampling.SAMPLE_LENGTH", 500)  # the length the child processes write
    names = ["bigram", "gpt"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children's thread count: this process's, for the same rounding
    with one_thread():
        assert compare_main("--models", "bigram,gpt", "--runs", "one", "--out", "one") == 0
        trainings.clear()
        capsys.readouterr()
        assert compare.main(["--data", "tiny.txt", *TINY, "--models", "bigram,gpt", "--runs", "two", "--jobs", "2"]) \
            == 0  # without --out: the tables go to the --runs directory
    assert trainings == []  # the training scripts ran in child processes
    out = capsys.readouterr().out
    for name in names:
        one, two = tmp_path / "one" / f"{name}_s1337", tmp_path / "two" / f"{name}_s1337"
        assert [(r["step"], r["train_loss"], r["val_loss"]) for r in read_metrics(two)] == \
            [(r["step"], r["train_loss"], r["val_loss"]) for r in read_metrics(one)]
        assert json.loads((two / "config.json").read_text())["machine"].endswith(" CPU, 1 torch thread")
        assert [json.loads((d / "config.json").read_text())["runs_at_once"] for d in (one, two)] == [1, 2]
        assert (two / "sample.txt").read_text() == (one / "sample.txt").read_text()
        assert f"step 4: train loss {read_metrics(two)[-1]['train_loss']:.4f}" in (two / "train.log").read_text()
        status = rf"^{name}_s1337 +done +step 4/4 +val loss {read_metrics(two)[-1]['val_loss']:.4f} "
        assert re.search(status, out, re.MULTILINE), out
    assert [row[0] for row in table_rows((tmp_path / "two" / "results.md").read_text())] == names
    assert ("Up to 2 runs trained at once: the tokens/s and wall times of the runs that did so were measured while "
            "they shared the machine.") in (tmp_path / "two" / "results.md").read_text()
    assert "trained at once" not in (tmp_path / "one" / "results.md").read_text()
    assert compare_main("--models", "bigram,gpt", "--runs", "one", "--out", "one", "--jobs", "2", "--report_only") == 0
    assert "trained at once" not in (tmp_path / "one" / "results.md").read_text()  # the runs', not the command's
    capsys.readouterr()
    assert not (tmp_path / "plots").exists() and not (tmp_path / "model_outputs").exists()
    assert compare_main("--models", "bigram,gpt", "--runs", "two", "--jobs", "2") == 0
    assert capsys.readouterr().out.startswith("bigram_s1337: reusing the finished run in two/bigram_s1337\n"
                                              "gpt_s1337: reusing the finished run in two/gpt_s1337\n")


def test_script_fails_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "compare.py"), "--models", "bigram,nope"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: unknown model 'nope' in --models")
    assert list(tmp_path.iterdir()) == []


def exact_losses(runs_dir, name, seeds):
    return [json.loads((runs_dir / f"{name}_s{seed}" / "eval.json").read_text())["val_loss"] for seed in seeds]


def time_to_target_cells(reached):
    """The steps, tokens and training seconds of the time-to-target table for the metrics rows at which each seed
    first reached the target: mean ± sample deviation, as the report prints them."""
    return [f"{np.mean(values):,.{digits}f} ± {np.std(values, ddof=1):,.{digits}f}"
            for values, digits in (([r[key] for r in reached], digits) for key, digits in
                                   (("step", 0), ("tokens", 0), ("train_s", 1)))]


def test_seeds_give_a_run_each_the_same_batches_per_seed_and_intervals_computed_from_the_run_files(
        trainings, tmp_path, monkeypatch):
    real_get = BatchSampler.get
    batches = {}  # (training, split) -> the x of every batch it drew

    def recording_get(sampler, split):
        x, y = real_get(sampler, split)
        batches.setdefault((len(trainings), split), []).append(x.clone())
        return x, y

    monkeypatch.setattr(BatchSampler, "get", recording_get)
    assert compare_main("--models", "gpt,GATConv", "--seeds", "2", "--target_loss", "5") == 0
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["GATConv_s1337", "GATConv_s1338", "gpt_s1337", "gpt_s1338"]
    order = [(argv[argv.index("--seed") + 1], "GATConv" if script == "pyg-gpt.py" else "gpt") for script, argv in
             trainings]
    assert order == [("1337", "gpt"), ("1338", "gpt"), ("1337", "GATConv"), ("1338", "GATConv")]
    for split in ("train", "val"):
        drawn = [batches[(i, split)] for i in range(1, 5)]
        assert all(torch.equal(a, b) for a, b in zip(drawn[0], drawn[2]))  # gpt and GATConv, seed 1337
        assert all(torch.equal(a, b) for a, b in zip(drawn[1], drawn[3]))  # seed 1338
        assert not torch.equal(drawn[0][0], drawn[1][0])  # another seed, other batches

    results = (tmp_path / "plots" / "results.md").read_text()
    rows = {row[0]: row for row in table_rows(results)}
    gpt, gat = exact_losses(runs, "gpt", (1337, 1338)), exact_losses(runs, "GATConv", (1337, 1338))
    for name, losses in (("gpt", gpt), ("GATConv", gat)):
        assert rows[name][1] == f"{np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f} (2)"
        bits = [loss / math.log(2) for loss in losses]
        assert rows[name][2] == f"{np.mean(bits):.4f} ± {np.std(bits, ddof=1):.4f} (2)"
    d = np.subtract(gat, gpt)
    low, high = t_interval(d)
    assert rows["GATConv"][3] == f"{d.mean():+.4f} [{low:+.4f}, {high:+.4f}] (2)"
    assert rows["GATConv"][4] == ("not distinguishable" if low <= 0 <= high else "higher" if low > 0 else "lower")
    assert rows["gpt"][3:5] == ["-", "-"]
    for name in ("gpt", "GATConv"):
        metrics = [read_metrics(runs / f"{name}_s{seed}") for seed in (1337, 1338)]
        rates = [np.median([r["tokens_per_s"] for r in rows_ if r["tokens_per_s"]]) for rows_ in metrics]
        assert rows[name][6] == f"{np.mean(rates):,.0f} ± {np.std(rates, ddof=1):,.0f}"  # each seed's median
        wall = np.mean([rows_[-1]["elapsed_s"] for rows_ in metrics])
        assert rows[name][7] == f"{wall:.1f}s"  # the mean of the seeds' times (under a minute here)
    assert "Δ: the mean over seeds of each seed's difference in nats from gpt" in results
    reached = [next(r for r in read_metrics(runs / f"gpt_s{seed}") if r["val_loss"] <= 5) for seed in (1337, 1338)]
    assert f"| gpt | {' | '.join(time_to_target_cells(reached))} |" in results
    assert matplotlib.image.imread(tmp_path / "plots" / "val_loss.png").shape[1] > 1200  # steps and seconds

    trainings.clear()
    assert compare_main("--models", "gpt,GATConv", "--seeds", "3") == 0
    assert [argv[argv.index("--seed") + 1] for _, argv in trainings] == ["1339", "1339"]
    rows = {row[0]: row for row in table_rows((tmp_path / "plots" / "results.md").read_text())}
    seeds = (1337, 1338, 1339)  # three values: a median or a deviation over n would differ from these
    gpt, gat = exact_losses(runs, "gpt", seeds), exact_losses(runs, "GATConv", seeds)
    for name, losses in (("gpt", gpt), ("GATConv", gat)):
        assert rows[name][1] == f"{np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f} (3)"
    d = np.subtract(gat, gpt)
    low, high = t_interval(d)
    assert rows["GATConv"][3] == f"{d.mean():+.4f} [{low:+.4f}, {high:+.4f}] (3)"


def test_each_model_is_reported_on_the_test_half_at_the_rate_chosen_on_the_tune_half(trainings, tmp_path, capsys):
    args = ["--models", "gpt,GATConv", "--seeds", "2", "--learning_rate", "1e-3,3e-2"]
    assert compare_main(*args) == 0
    runs, seeds = tmp_path / "runs", (1337, 1338)
    assert sorted(p.name for p in runs.iterdir()) == [f"{m}_lr{r}_s{s}" for m in ("GATConv", "gpt")
                                                      for r in ("0.001", "0.03") for s in seeds]
    evals = {(m, r, s): json.loads((runs / f"{m}_lr{r}_s{s}" / "eval.json").read_text())
             for m in ("gpt", "GATConv") for r in ("0.001", "0.03") for s in seeds}
    assert all(json.loads((runs / f"{m}_lr{r}_s{s}" / "config.json").read_text())["settings"]["learning_rate"]
               == float(r) for m, r, s in evals)
    chosen = {m: min(("0.001", "0.03"), key=lambda r: np.mean([evals[m, r, s]["tune_loss"] for s in seeds]))
              for m in ("gpt", "GATConv")}
    results = (tmp_path / "plots" / "results.md").read_text()
    rows = {row[0]: row for row in table_rows(results)}
    for m in ("gpt", "GATConv"):
        test = [evals[m, chosen[m], s]["test_loss"] for s in seeds]
        assert rows[m][1] == chosen[m]
        assert rows[m][2] == "0.001, 0.03 (at the edge of the grid: try further)"  # two rates: always an edge
        assert rows[m][3] == f"{np.mean(test):.4f} ± {np.std(test, ddof=1):.4f} (2)"
        bits = [loss / math.log(2) for loss in test]
        assert rows[m][4] == f"{np.mean(bits):.4f} ± {np.std(bits, ddof=1):.4f} (2)"
    d = np.subtract([evals["GATConv", chosen["GATConv"], s]["test_loss"] for s in seeds],
                    [evals["gpt", chosen["gpt"], s]["test_loss"] for s in seeds])
    low, high = t_interval(d)
    assert rows["GATConv"][5] == f"{d.mean():+.4f} [{low:+.4f}, {high:+.4f}] (2)"
    assert rows["GATConv"][6] == ("not distinguishable" if low <= 0 <= high else "higher" if low > 0 else "lower")
    assert "Chosen at the edge of the grid, where a better rate may lie beyond it: gpt (" in results
    every = table_rows(results.split("Every configuration at every learning rate")[1])
    assert [row[:2] for row in every] == [[m, r] for m in ("gpt", "GATConv") for r in ("0.001", "0.03")]
    assert [row[-1] for row in every] == ["chosen" if r == chosen[m] else "" for m in ("gpt", "GATConv")
                                          for r in ("0.001", "0.03")]
    for row in every:
        for cell, key in zip(row[2:5], ("tune_loss", "test_loss", "val_loss")):
            losses = [evals[row[0], row[1], s][key] for s in seeds]
            assert cell == f"{np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f} (2)", (row, key)
    for name in ("val_loss", "learning_rates", "loss_by_position"):
        assert matplotlib.image.imread(tmp_path / "plots" / f"{name}.png").ndim == 3
    assert (tmp_path / "plots" / "model_outputs" / "gpt.txt").read_text() == \
        (runs / f"gpt_lr{chosen['gpt']}_s1337" / "sample.txt").read_text()

    for checkpoint in runs.glob("*/ckpt.pt"):
        checkpoint.unlink()
    (tmp_path / "plots" / "results.md").unlink()
    assert compare_main(*args, "--report_only") == 0
    assert (tmp_path / "plots" / "results.md").read_text() == results

    curves = {m: [read_metrics(runs / f"{m}_lr{chosen[m]}_s{s}") for s in seeds] for m in ("gpt", "GATConv")}
    target = max(min(r["val_loss"] for r in curve) for m in curves for curve in curves[m])  # every chosen run's
    assert compare_main(*args, "--report_only", "--target_loss", repr(target)) == 0
    timed = (tmp_path / "plots" / "results.md").read_text().split(f"Time to a validation loss of {target} at the "
                                                                  f"chosen rates")[1]
    expected = []
    for m in ("gpt", "GATConv"):
        reached = [next(r for r in curve if r["val_loss"] <= target) for curve in curves[m]]
        expected.append([m, *time_to_target_cells(reached)])
    assert table_rows(timed) == expected

    trainings.clear()
    assert compare_main("--models", "gpt,GATConv", "--seeds", "2", "--learning_rate", "1e-3,3e-2,1e-2") == 0
    assert sorted((argv[argv.index("--learning_rate") + 1], argv[argv.index("--seed") + 1]) for _, argv in trainings) \
        == [("0.01", "1337"), ("0.01", "1337"), ("0.01", "1338"), ("0.01", "1338")]  # only the new rate trains


def test_a_rate_whose_every_training_failed_stays_in_the_grid_and_ends_it(trainings, tmp_path, monkeypatch):
    real_main = cli.main

    def diverge_at_high_rates(script, argv):
        return 1 if float(argv[argv.index("--learning_rate") + 1]) > 0.01 else real_main(script, argv)

    monkeypatch.setattr(cli, "main", diverge_at_high_rates)
    assert compare_main("--models", "gpt", "--learning_rate", "1e-3,3e-3,3e-2") == 1
    results = (tmp_path / "plots" / "results.md").read_text()
    tune = {r: json.loads((tmp_path / "runs" / f"gpt_lr{r}_s1337" / "eval.json").read_text())["tune_loss"]
            for r in ("0.001", "0.003")}
    chosen = min(tune, key=tune.get)
    edge = " (at the edge of the grid: try further)" if chosen == "0.001" else ""  # 0.03 failed: no further up
    assert table_rows(results)[0][1:3] == [chosen, f"0.001, 0.003, 0.03 (failed){edge}"]
    every = table_rows(results.split("Every configuration at every learning rate")[1])
    assert [row[1] for row in every] == ["0.001", "0.003", "0.03"]
    assert every[2][2:] == ["-", "-", "-", "training failed (exit code 1)"]
    assert "- Rates at which every training failed, so that the choice could not weigh them: gpt (0.03); " in results


def test_a_failed_rate_above_the_chosen_one_ends_the_search_upwards_and_one_below_measured_nothing():
    configs = [tune_config(1e-3, {1: 1.5}), tune_config(2e-3, {1: 1.3})]
    assert tuning.choose_rates(configs)[0].edge == "highest"
    (choice,) = tuning.choose_rates(configs, {"gpt": {4e-3: 1}})  # too large to train
    assert choice.chosen is configs[1] and choice.grid == [1e-3, 2e-3, 4e-3] and choice.edge is None
    assert choice.rates == [1e-3, 2e-3]  # the rates with losses to plot
    assert tuning.choose_rates(configs, {"gpt": {5e-4: 1}})[0].edge == "highest"
    assert tuning.choose_rates(configs, {"gpt": {1.5e-3: 1}})[0].edge == "highest"  # failed between the two
    configs[0]["halves"]["tune"]["loss_by_seed"] = {1: 1.2}
    (choice,) = tuning.choose_rates(configs, {"gpt": {5e-4: 1}})  # a crash below: nothing measured there
    assert choice.chosen is configs[0] and choice.edge == "lowest"
    (choice,) = tuning.choose_rates(configs[:1], {"gpt": {2e-3: 1}})  # one rate finished, the one above failed
    assert choice.edge == "lowest"


def test_one_rate_per_model_trains_there_and_reports_as_usual(trainings, tmp_path):
    assert compare_main("--models", "bigram,gpt", "--learning_rate", "2e-3", "--learning_rate", "bigram=2e-2") == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["bigram_lr0.02_s1337", "gpt_lr0.002_s1337"]
    results = (tmp_path / "plots" / "results.md").read_text()
    assert results.startswith("# Results\n") and "learning_rate 0.002 instead of 0.001 (gpt)" in results
    assert [row[0] for row in table_rows(results)] == ["bigram", "gpt"]


def test_a_setting_names_the_models_that_differ_or_the_fewer_that_do_not():
    def config(name, arch, **changed):
        return {"name": name, "preset": "cpu", "arch": arch, "settings": {**PRESETS["cpu"][arch], **changed}}

    configs = [config("bigram", "bigram"), config("gpt", "gpt", n_layer=2), config("GATConv", "gpt", n_layer=2),
               config("GCNConv", "gpt", n_layer=2, max_iters=300)]
    assert "n_layer" not in configs[0]["settings"]  # the bigram has no layers to count
    assert results.setting_notes(configs) == ["- n_layer 2 instead of 4 (all models that have it)",
                                              "- max_iters 300 instead of 2000 (GCNConv)"]
    configs.append(config("SAGEConv", "gpt"))
    assert results.setting_notes(configs)[0] == "- n_layer 2 instead of 4 (all models but SAGEConv)"
    configs[4]["settings"]["n_layer"] = 2
    configs[0]["settings"]["max_iters"] = 300
    assert results.setting_notes(configs, ignored=("n_layer",)) == ["- max_iters 300 instead of 2000 (bigram, GCNConv)"]


def tune_config(rate, loss_by_seed):
    return {"name": "gpt", "learning_rate": rate,
            "halves": {"tune": {"loss_by_seed": loss_by_seed, "targets": 50}, "test": {"targets": 50}}}


def test_a_rate_between_others_is_chosen_without_an_edge_flag():
    configs = [tune_config(3e-3, {1: 1.5}), tune_config(1e-3, {1: 1.4}), tune_config(2e-3, {1: 1.3})]
    (choice,) = tuning.choose_rates(configs)
    assert choice.rates == [1e-3, 2e-3, 3e-3] and choice.chosen is configs[2] and choice.edge is None
    configs[1]["halves"]["tune"]["loss_by_seed"] = {1: 1.2}
    assert tuning.choose_rates(configs)[0].edge == "lowest"


def test_rates_are_compared_over_the_seeds_they_share():
    # seed 2, a lucky one, trained only at 1e-3 (its training at 2e-3 failed): on seed 1 alone 2e-3 is better
    configs = [tune_config(1e-3, {1: 1.40, 2: 1.10}), tune_config(2e-3, {1: 1.30})]
    choices = tuning.choose_rates(configs)
    assert choices[0].chosen is configs[1]
    assert "- Not every rate has every seed for gpt (a training failed): their rates are compared over the seeds " \
           "all of them have" in tuning.tuning_notes(choices, None)
    configs = [tune_config(1e-3, {1: 1.40}), tune_config(2e-3, {2: 1.30})]  # no seed in common: each its own
    assert tuning.choose_rates(configs)[0].chosen is configs[1]
    configs = [tune_config(1e-3, {1: 1.40, 2: 1.10}), tune_config(2e-3, {1: 1.30, 2: 1.30})]
    choices = tuning.choose_rates(configs)
    assert choices[0].chosen is configs[0] and "Not every rate" not in tuning.tuning_notes(choices, None)


def test_two_jobs_share_the_cores(trainings, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert compare_main("--models", "bigram,gpt", "--jobs", "2") == 0
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    for name in ("bigram", "gpt"):
        config = json.loads((tmp_path / "runs" / f"{name}_s1337" / "config.json").read_text())
        assert config["torch_threads"] == share
        assert config["machine"].endswith(f" CPU, {share} torch thread{'s' if share > 1 else ''}")
    assert f"CPU, {share} torch thread" in (tmp_path / "plots" / "results.md").read_text()


def test_a_report_rebuilt_from_the_run_files_alone_is_the_same(trainings, tmp_path, capsys):
    args = ["--models", "bigram,gpt", "--seed", "7,3", "--baseline", "bigram", "--target_loss", "4"]
    assert compare_main(*args) == 0
    results = (tmp_path / "plots" / "results.md").read_text()
    assert "Δ vs bigram (nats) [95% CI]" in results and "(seed 7)" in results
    for checkpoint in (tmp_path / "runs").glob("*/ckpt.pt"):
        checkpoint.unlink()
    (tmp_path / "plots" / "results.md").unlink()
    samples = {p.name: p.read_text() for p in (tmp_path / "plots" / "model_outputs").iterdir()}
    shutil.rmtree(tmp_path / "plots" / "model_outputs")
    trainings.clear()
    assert compare_main(*args, "--report_only") == 0
    assert trainings == []
    assert (tmp_path / "plots" / "results.md").read_text() == results
    assert {p.name: p.read_text() for p in (tmp_path / "plots" / "model_outputs").iterdir()} == samples

    (tmp_path / "runs" / "gpt_s3" / "eval.json").unlink()
    capsys.readouterr()
    assert compare_main(*args, "--report_only") == 2
    assert capsys.readouterr().err == ("error: --report_only needs every run finished with its eval.json, and "
                                       "runs/gpt_s3 (no eval.json, and no checkpoint to go on from) is not; run the "
                                       "same command without --report_only, with --overwrite for those that can "
                                       "neither be reused nor resumed\n")
    assert compare_main("--models", "gpt", "--seed", "7", "--data", "./tiny.txt", "--report_only") == 2
    assert capsys.readouterr().err == ("error: --report_only needs every run finished with its eval.json, and "
                                       "runs/gpt_s7 (other settings; data was tiny.txt, now ./tiny.txt) is not; give "
                                       "the settings the runs were trained with (a relative --data as it was given, "
                                       "from the directory they were trained in)\n")
    assert compare_main("--models", "gpt,GATConv", "--seed", "7", "--data", "./tiny.txt", "--report_only") == 2
    assert capsys.readouterr().err.endswith("runs/GATConv_s7 (not there) are not; for those of other settings, give "
                                            "the settings the runs were trained with (a relative --data as it was "
                                            "given, from the directory they were trained in); for the others, run the "
                                            "same command without --report_only\n")

    args = ["--models", "bigram,gpt", "--seed", "7"]
    for config_file in (tmp_path / "runs").glob("*_s7/config.json"):  # as runs trained on a GPU, read on this CPU
        config_file.write_text(config_file.read_text().replace('"device": "cpu"', '"device": "cuda"'))
    assert compare_main(*args, "--preset", "cpu", "--device", "cuda", "--report_only") == 0
    assert [row[0] for row in table_rows((tmp_path / "plots" / "results.md").read_text())] == ["bigram", "gpt"]


@pytest.mark.parametrize("value", [math.nan, True])
def test_a_loss_that_is_not_a_finite_number_is_refused_with_its_run(value, trainings, tmp_path, capsys):
    assert compare_main("--models", "bigram,gpt") == 0
    eval_file = tmp_path / "runs" / "gpt_s1337" / "eval.json"
    eval_file.write_text(json.dumps({**json.loads(eval_file.read_text()), "test_loss": value}))
    capsys.readouterr()
    assert compare_main("--models", "bigram,gpt", "--report_only") == 2
    assert capsys.readouterr().err == (f"error: runs/gpt_s1337 has an exact test_loss that is not a finite number "
                                       f"({value}); remove the run and train it again, at a lower --learning_rate if "
                                       f"its loss diverges\n")


@pytest.mark.parametrize("change,problem", [
    (lambda config: config.pop("machine"), "has no machine of the right type"),
    (lambda config: config.update(parameters="x"), "has no parameters of the right type"),
    (lambda config: config.update(arch=1), "has no arch of the right type"),
    (lambda config: config.update(parameters=True), "has no parameters of the right type"),
])
def test_a_config_json_the_report_cannot_read_is_refused_with_its_run(change, problem, trainings, tmp_path, capsys):
    assert compare_main("--models", "bigram") == 0
    config_file = tmp_path / "runs" / "bigram_s1337" / "config.json"
    config = json.loads(config_file.read_text())
    change(config)
    config_file.write_text(json.dumps(config))
    capsys.readouterr()
    assert compare_main("--models", "bigram", "--report_only") == 2
    assert capsys.readouterr().err == (f"error: runs/bigram_s1337/config.json {problem}; restore it, or remove the run "
                                       f"and train it again\n")


@pytest.mark.parametrize("content,why", [
    ("{", "eval.json cannot be read (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
    ("[]", "eval.json cannot be read (not a JSON object)"),
    ('{"step": 2, "val_loss": 1, "val_bpc": 1.4, "targets": 9}', "eval.json is of step 2, not 4"),  # a run extended
    ('{"step": 4}', "eval.json cannot be read (no val_loss, val_bpc, targets)"),
    ('{"step": 4, "val_loss": 1, "val_bpc": 1.4, "targets": "x"}',
     "eval.json cannot be read (its step or targets is no whole number)"),
    ('{"step": true, "val_loss": 1, "val_bpc": 1.4, "targets": 9}',
     "eval.json cannot be read (its step or targets is no whole number)"),
])
def test_report_only_says_why_a_finished_run_s_exact_loss_cannot_serve(content, why, trainings, tmp_path, capsys):
    assert compare_main("--models", "gpt") == 0
    (tmp_path / "runs" / "gpt_s1337" / "eval.json").write_text(content)
    capsys.readouterr()
    assert compare_main("--models", "gpt", "--report_only") == 2
    assert capsys.readouterr().err == (f"error: --report_only needs every run finished with its eval.json, and "
                                       f"runs/gpt_s1337 ({why}) is not; run the same command without --report_only\n")
    assert compare_main("--models", "gpt") == 0  # which makes it again from the checkpoint
    assert compare_main("--models", "gpt", "--report_only") == 0


def test_a_reused_run_without_an_exact_loss_gets_it_from_its_checkpoint(trainings, tmp_path, capsys):
    assert compare_main("--models", "gpt") == 0
    run = tmp_path / "runs" / "gpt_s1337"
    stored = (run / "eval.json").read_text()
    (run / "eval.json").unlink()  # as a run trained before every training ended with it
    capsys.readouterr()
    assert compare_main("--models", "gpt") == 0
    assert "gpt_s1337: exact validation loss " in capsys.readouterr().out
    recomputed, original = json.loads((run / "eval.json").read_text()), json.loads(stored)
    assert {k: recomputed[k] for k in ("step", "val_loss", "val_bpc", "targets")} == \
        {k: original[k] for k in ("step", "val_loss", "val_bpc", "targets")}


def test_an_exact_loss_that_does_not_fit_in_memory_says_how_to_write_it_in_smaller_batches(trainings, tmp_path,
                                                                                            monkeypatch, capsys):
    assert compare_main("--models", "gpt") == 0
    run = tmp_path / "runs" / "gpt_s1337"
    stored = json.loads((run / "eval.json").read_text())
    (run / "eval.json").unlink()
    real = runner.exact_evaluation

    def fits_in_batches_of_2(model, data, settings, device, batch_size=None, **kwargs):
        if (batch_size or settings["batch_size"]) > 2:
            allocation_fails()
        return real(model, data, settings, device, batch_size, **kwargs)

    monkeypatch.setattr(runner, "exact_evaluation", fits_in_batches_of_2)
    monkeypatch.setattr(evaluate, "exact_evaluation", fits_in_batches_of_2)
    capsys.readouterr()
    assert compare_main("--models", "gpt") == 2
    command = "python evaluate.py --out_dir runs/gpt_s1337 --write --batch_size 2"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: the exact evaluation of runs/gpt_s1337 in batches of 4 windows does not fit in memory "
        f"({ALLOCATION_ERROR}); write it in smaller batches with {command}, then run the same command again")
    assert evaluate.main(["--out_dir", "runs/gpt_s1337", "--write"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: the evaluation in batches of 4 windows does not fit in memory ({ALLOCATION_ERROR}); evaluate in "
        f"smaller batches with a lower --batch_size")
    assert evaluate.main(shlex.split(command)[2:]) == 0
    assert compare_main("--models", "gpt") == 0
    written = json.loads((run / "eval.json").read_text())
    assert (written["step"], written["targets"]) == (stored["step"], stored["targets"])
    assert written["val_loss"] == pytest.approx(stored["val_loss"], abs=1e-5)  # in other batches, the same windows

    config = json.loads((run / "config.json").read_text())  # a run trained one window at a time
    (run / "config.json").write_text(json.dumps({**config, "settings": {**config["settings"], "batch_size": 1}}))
    (run / "eval.json").unlink()
    monkeypatch.setattr(runner, "exact_evaluation", allocation_fails)  # not even one window fits
    with pytest.raises(UsageError, match=r"^the exact evaluation of \S+ one window at a time does not fit in memory "
                                         r"\(.+\); a single window does not fit either: free memory on the device, "
                                         r"then run the same command again$"):
        runner.write_missing_exact_loss(SimpleNamespace(out_dir=run, name="gpt", expected={"device": "cpu"}))


@pytest.mark.parametrize("difference,verdict", [
    (Difference(0.02, 0.01, 0.03, 3), "higher"),
    (Difference(-0.02, -0.03, -0.01, 3), "lower"),
    (Difference(0.01, 0.00004, 0.02, 3), "not distinguishable"),  # printed as [+0.0000, +0.0200]
    (Difference(0.01, -0.01, 0.03, 3), "not distinguishable"),
    (Difference(0.01, None, None, 1), "needs 2 seeds in common"),
    (Difference(math.nan, math.nan, math.nan, 3), "not distinguishable"),
    (Difference(math.inf, math.inf, math.inf, 3), "not distinguishable"),
    (None, "no common seed"),
])
def test_a_difference_is_called_one_only_where_its_printed_interval_excludes_zero(difference, verdict):
    assert results.verdict(difference) == verdict


def test_a_difference_names_how_many_seeds_it_pairs_when_a_run_is_missing():
    config = {"loss_by_seed": {1337: 1.50, 1338: 1.61, 1339: 1.47}}
    baseline = {"loss_by_seed": {1337: 1.40, 1339: 1.42}}  # seed 1338 of the baseline failed
    d = np.array([1.50 - 1.40, 1.47 - 1.42])
    low, high = t_interval(d)
    assert results.baseline_columns(config, baseline) == [f"{d.mean():+.4f} [{low:+.4f}, {high:+.4f}] (2)",
                                                          "not distinguishable" if low <= 0 <= high else "higher"]
    assert results.baseline_columns(config, {"loss_by_seed": {1338: 1.51}}) == ["+0.1000 (1)",
                                                                                "needs 2 seeds in common"]
    assert results.baseline_columns(config, {"loss_by_seed": {7: 1.5}}) == ["no common seed", "no common seed"]
