import csv
import errno
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ALLOCATION_ERROR, TINY_GPT_RUN, allocation_fails, build_fails, tiny_config, train_tiny_gpt
from gnngpt import cli, guard
from gnngpt.cli import build_parser, main, resolve_device
from gnngpt.config import (
    BIGRAM as BIGRAM_SCRIPT,
    GPT as GPT_SCRIPT,
    PRESETS,
    PUBLISHED_STEP,
    PUBLISHED_VAL_LOSS,
    PYG_GPT,
    SEED,
    resolve_preset,
)
from gnngpt.data import BatchSampler
from gnngpt.errors import UsageError, exit_code
from gnngpt.fast_gat import compile_failures
from gnngpt.files import atomic_write
from gnngpt.models import GPT, GPTConfig
from gnngpt.train import evaluate

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--max_iters", "6", "--eval_interval", "3", "--eval_iters", "2", "--batch_size", "4",
        "--block_size", "16", "--device", "cpu", "--learning_rate", "1e-2"]
TINY_GPT = TINY + ["--n_embd", "16", "--n_head", "2", "--n_layer", "1"]
SAMPLE_SCRIPT, EVALUATE_SCRIPT, BENCH_SCRIPT = "sample.py", "evaluate.py", "bench.py"
SCRIPTS = {
    "GATConv": ["pyg-gpt.py", "--gat_version", "GATConv", *TINY_GPT],
    "GATv2Conv": ["pyg-gpt.py", "--gat_version", "GATv2Conv", *TINY_GPT],
    "gpt": ["gpt.py", *TINY_GPT],
    "bigram": ["bigram.py", *TINY],
}


def run_script(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_end_to_end_writes_run_files_and_sample(name, tiny_text_file, tmp_path):
    result = run_script([*SCRIPTS[name], "--data", str(tiny_text_file), "--out_dir", "out"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"{name}: preset cpu, device cpu" in result.stdout
    assert "parameters" in result.stdout
    for step in (0, 3, 6):
        assert f"step {step}: train loss" in result.stdout
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["name"] == name and config["device"] == "cpu" and config["preset"] == "cpu"
    assert config["settings"]["max_iters"] == 6 and config["settings"]["batch_size"] == 4
    assert {"torch", "torch_geometric", "python"} <= set(config["versions"])
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "train_loss", "val_loss", "elapsed_s", "tokens_per_s", "train_s", "tokens"]
    assert [int(r["step"]) for r in rows] == [0, 3, 6]
    assert float(rows[-1]["tokens_per_s"]) > 0
    assert [int(r["tokens"]) for r in rows] == [0, 3 * 4 * 16, 6 * 4 * 16]  # steps x batch x block
    train_s = [float(r["train_s"]) for r in rows]
    assert train_s[0] == 0 < train_s[1] <= train_s[2] <= float(rows[-1]["elapsed_s"]) + 0.01
    exact = json.loads((out / "eval.json").read_text())
    assert exact["step"] == 6 and exact["val_bpc"] == pytest.approx(exact["val_loss"] / math.log(2), abs=1e-6)
    assert f"exact validation loss {exact['val_loss']:.4f} nats, {exact['val_bpc']:.4f} bits per character" \
        in result.stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["name"] == name
    assert {"model", "optimizer", "config", "vocab", "model_config"} <= set(ckpt)
    sample = (out / "sample.txt").read_text()  # --out_dir is not the default: the sample goes there
    assert len(sample) == 501 and sample in result.stdout
    assert f"wrote out/config.json, metrics.csv, ckpt.pt, eval.json, loss_by_position.csv and " \
        f"{Path('out') / 'sample.txt'}\n" in result.stdout
    assert not (tmp_path / "model_outputs").exists()
    assert set(sample) <= set(ckpt["vocab"])


def test_explicit_flags_override_the_paper_preset(tiny_text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(GPT_SCRIPT, ["--preset", "paper", *TINY_GPT, "--data", str(tiny_text_file)]) == 0
    config = json.loads((tmp_path / "runs" / "gpt" / "config.json").read_text())
    assert len((tmp_path / "runs" / "gpt" / "sample.txt").read_text()) == 501  # beside the run, as any other's
    assert not (tmp_path / "model_outputs").exists()  # the shipped samples are compare.py's
    assert config["preset"] == "paper"
    assert config["settings"]["dropout"] == 0.2  # from the preset
    assert config["settings"]["n_embd"] == 16  # from the flag


BAD_INPUTS = [
    (["--gat_version", "GATv3Conv"], "unknown --gat_version 'GATv3Conv'; did you mean GATv2Conv? "),
    (["--gat_version", "gatconv"], "unknown --gat_version 'gatconv'; did you mean GATConv? "),
    (["--gat_version", "gatv2conv"], "unknown --gat_version 'gatv2conv'; did you mean GATv2Conv? "),
    (["--n_embd", "30", "--n_head", "4"], "n_embd 30 is not divisible by n_head 4"),
    (["--batch_size", "0"], "--batch_size must be a positive integer, got 0"),
    (["--block_size", "-3"], "--block_size must be a positive integer, got -3"),
    (["--max_iters", "0"], "--max_iters must be a positive integer"),
    (["--eval_interval", "0"], "--eval_interval must be a positive integer"),
    (["--eval_iters", "0"], "--eval_iters must be a positive integer"),
    (["--n_layer", "0"], "--n_layer must be a positive integer"),
    (["--learning_rate", "0"], "--learning_rate must be a positive number, got 0.0"),
    (["--learning_rate", "nan"], "--learning_rate must be a positive number, got nan"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 2**63 - 1, got -1"),
    (["--seed", str(2**64)], f"--seed must be an integer from 0 to 2**63 - 1, got {2**64}"),
    (["--block_size", "5000"], "--data has too little text for block_size 5000: 11,781 token(s), 10,602 for training "
                               "and 1,179 for validation"),
    (["--data", "one.txt"], "--data has too little text for block_size 16: 1 token(s), 0 for training and 1 for "
                            "validation, where each split needs at least block_size + 1; use a smaller --block_size "
                            "or a longer --data text"),
    (["--data", "missing.txt"], "data file missing.txt does not exist"),
    (["--data", "."], "data file . is a directory; pass --data PATH to a UTF-8 text file in it"),
    (["--resume", "--overwrite"], "error: --resume and --overwrite exclude each other: --resume continues the run in "
                                  "--out_dir, --overwrite replaces it; pass one of them\n"),
    (["--graph", "[window:4"], "error: --graph '[window:4' has a bracket; write a per-layer list without brackets"),
    (["--exact_at", "4"], "error: --exact_at 4 is not an evaluation step before the last (a multiple of "
                          "--eval_interval"),
    (["--data", "empty.txt"], "data file empty.txt is empty"),
    (["--data", "latin1.txt"], "data file latin1.txt is not UTF-8"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_gives_one_line_error_and_writes_nothing(args, message, tiny_text_file, tmp_path,
                                                           monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("àéî".encode("latin-1"))
    (tmp_path / "one.txt").write_text("a")
    before = set(tmp_path.iterdir())
    argv = ["--data", str(tiny_text_file), *TINY_GPT, *args]
    assert main(PYG_GPT, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert set(tmp_path.iterdir()) == before


def test_exact_at_writes_what_a_run_that_ends_there_writes(in_tmp_path, tiny_text_file, capsys):
    assert train_tiny_gpt("long", "tiny.txt", "--max_iters", "6", "--eval_interval", "2", "--exact_at", "2,4") == 0
    assert "step 4: exact validation loss " in capsys.readouterr().out
    assert train_tiny_gpt("short", "tiny.txt", "--max_iters", "4", "--eval_interval", "2") == 0
    snapshot = json.loads((in_tmp_path / "long" / "eval_step4.json").read_text())
    ended = json.loads((in_tmp_path / "short" / "eval.json").read_text())
    assert snapshot.pop("eval_s") >= 0 and ended.pop("eval_s") >= 0
    assert snapshot == ended and snapshot["step"] == 4  # the same batches and weights up to step 4
    assert (in_tmp_path / "long" / "loss_by_position_step4.csv").read_text() == \
        (in_tmp_path / "short" / "loss_by_position.csv").read_text()
    assert json.loads((in_tmp_path / "long" / "eval_step2.json").read_text())["step"] == 2
    assert json.loads((in_tmp_path / "long" / "eval.json").read_text())["step"] == 6
    assert train_tiny_gpt("long", "tiny.txt", "--max_iters", "6", "--eval_interval", "2", "--overwrite") == 0
    assert not list((in_tmp_path / "long").glob("*_step*"))  # a replaced run leaves no snapshot of the old one


def test_a_resumed_run_takes_the_snapshots_it_can_and_refuses_those_it_has_passed(in_tmp_path, tiny_text_file,
                                                                                  capsys):
    assert train_tiny_gpt("run", "tiny.txt", "--max_iters", "4", "--eval_interval", "2") == 0
    ended = json.loads((in_tmp_path / "run" / "eval.json").read_text())
    before = sorted(p.name for p in (in_tmp_path / "run").iterdir())
    capsys.readouterr()
    longer = ["--max_iters", "8", "--eval_interval", "2", "--resume"]
    assert train_tiny_gpt("run", "tiny.txt", *longer, "--exact_at", "2,6") == 2
    assert capsys.readouterr().err == (f"error: --exact_at 2 is before step 4, where the run in {Path('run')} resumes, "
                                       f"and the run has no snapshot of it: its weights at step 2 are gone; choose "
                                       f"steps from 4 on, or train the run again with --overwrite\n")
    assert sorted(p.name for p in (in_tmp_path / "run").iterdir()) == before
    assert train_tiny_gpt("run", "tiny.txt", *longer, "--exact_at", "4,6") == 0
    snapshot = json.loads((in_tmp_path / "run" / "eval_step4.json").read_text())
    assert snapshot.pop("eval_s") >= 0 and ended.pop("eval_s") >= 0
    assert snapshot == ended  # taken from the checkpoint it resumed from, the weights that ended the first run
    assert json.loads((in_tmp_path / "run" / "eval_step6.json").read_text())["step"] == 6
    at_8 = json.loads((in_tmp_path / "run" / "eval.json").read_text())
    for step in (4, 8):  # a snapshot cut short, or an eval.json of step 8 copied over it: unreadable as a snapshot
        (in_tmp_path / "run" / f"eval_step{step}.json").write_text("{" if step == 4 else json.dumps(ended))
    capsys.readouterr()
    even_longer = ["--max_iters", "10", "--eval_interval", "2", "--resume"]
    assert train_tiny_gpt("run", "tiny.txt", *even_longer, "--exact_at", "4,8") == 2
    assert capsys.readouterr().err.startswith("error: --exact_at 4 is before step 8, where the run in ")
    assert train_tiny_gpt("run", "tiny.txt", *even_longer, "--exact_at", "8") == 0
    retaken = json.loads((in_tmp_path / "run" / "eval_step8.json").read_text())
    assert retaken.pop("eval_s") >= 0 and at_8.pop("eval_s") >= 0
    assert retaken == at_8


@pytest.mark.parametrize("in_training,go_on", [(False, []), (True, ["--resume"])],
                         ids=["before the first checkpoint", "after it"])
def test_torch_compile_failing_to_build_is_one_line_saying_how_to_go_on_without_it(in_training, go_on, tmp_path,
                                                                                   tiny_text_file, monkeypatch,
                                                                                   capsys):
    from torch._dynamo.exc import BackendCompilerFailed

    def failing_compile(model):  # inductor's build fails at the first pass it compiles (in_training: a step's)
        forward = model.forward

        def compiled_forward(*args, **kwargs):
            if torch.is_grad_enabled() or not in_training:
                build_fails()
            return forward(*args, **kwargs)
        model.forward = compiled_forward
        return model

    args = ["--data", str(tiny_text_file), "--out_dir", str(tmp_path / "out"), *TINY_GPT]
    monkeypatch.setattr(cli, "compiled", failing_compile)
    monkeypatch.setattr(cli, "compiler_available", lambda: True)  # the build fails, whether or not g++ is here
    assert main(GPT_SCRIPT, [*args, "--compile"]) == 1
    err = capsys.readouterr().err
    assert err.replace("\r", "\n").endswith(  # after any progress bar
        f"\nerror: torch.compile could not compile the model (RuntimeError: C++ compile error); train it without "
        f"--compile{', with --resume' if in_training else ''}\n") and "Traceback" not in err
    assert (tmp_path / "out" / "ckpt.pt").is_file() == in_training
    assert (tmp_path / "out").exists() == in_training  # before its first checkpoint a run leaves nothing
    assert main(GPT_SCRIPT, [*args, *go_on]) == 0
    with pytest.raises(BackendCompilerFailed):  # without --compile: a fused kernel's own, under GNNGPT_NO_FALLBACK
        with compile_failures(False, "the model", lambda: "train it without --compile"):
            build_fails()


@pytest.mark.parametrize("kwargs,asked,backend", [
    ("{}", "fast", "fast (masked dense attention)"),
    ("{}", "pyg", "pyg (message passing)"),
    ('{"aggr": "mean"}', "fast", "pyg (message passing: the fast backend does not cover TransformerConv with "
                                 "aggr='mean' (the dense form sums, as aggr='add'))"),
])
def test_training_says_which_backend_computes_the_layer(kwargs, asked, backend, tiny_text_file, tmp_path, capsys):
    args = ["--gnn", "TransformerConv", "--gnn_kwargs", kwargs, "--backend", asked, *TINY_GPT]
    assert main(PYG_GPT, ["--data", str(tiny_text_file), "--out_dir", str(tmp_path / "out"), *args]) == 0
    assert f"\nbackend: {backend}\n" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(tiny_text_file, capsys):
    assert main(GPT_SCRIPT, ["--device", "cuda", "--data", str(tiny_text_file)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"),
                                               (False, False, "cpu")])
def test_auto_device_is_cuda_then_mps_then_cpu(cuda, mps, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu")
    for name, available in (("cuda", cuda), ("mps", mps)):
        if available:
            assert resolve_device(name) == torch.device(name)
        else:
            with pytest.raises(UsageError, match=f"^--device {name} was requested but {name.upper()} is not available"):
                resolve_device(name)


def test_mps_without_mps_is_refused(tiny_text_file, monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert main(GPT_SCRIPT, ["--device", "mps", "--data", str(tiny_text_file)]) == 2
    assert capsys.readouterr().err == ("error: --device mps was requested but MPS is not available (it needs Apple "
                                       "silicon and a PyTorch built with MPS); use --device cpu or auto\n")


def test_compile_on_a_cpu_without_a_cpp_compiler_is_refused(tiny_text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("gnngpt.cli.compiler_available", lambda: False)
    assert main(GPT_SCRIPT, ["--compile", "--device", "cpu", "--data", str(tiny_text_file)]) == 2
    assert capsys.readouterr().err == ("error: --compile on a CPU needs a C++ compiler (g++ or clang++) and none was "
                                       "found; install one or drop --compile\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bfloat16_without_cuda_is_refused(tiny_text_file, capsys):
    assert main(GPT_SCRIPT, ["--dtype", "bfloat16", "--data", str(tiny_text_file)]) == 2
    assert capsys.readouterr().err == ("error: --dtype bfloat16 needs a CUDA GPU with bf16 support; "
                                       "use --dtype float32 here\n")


def test_bfloat16_autocast_evaluates_close_to_float32():
    data = torch.randint(0, 17, (2000,))
    model = GPT(tiny_config("GATv2Conv")).eval()
    losses = {}
    for dtype in ("float32", "bfloat16"):
        sampler = BatchSampler(data[:1800], data[1800:], block_size=12, batch_size=4, device="cpu", seed=0)
        losses[dtype] = evaluate(model, sampler, eval_iters=3, dtype=dtype)
    assert losses["float32"] != losses["bfloat16"]  # autocast really ran in bf16
    for split in ("train", "val"):
        assert abs(losses["float32"][split] - losses["bfloat16"][split]) < 0.05


@pytest.mark.parametrize("training", [True, False])
def test_an_evaluation_is_the_mean_loss_of_its_batches_of_each_split_and_leaves_the_models_mode(training):
    data = torch.randint(0, 17, (2000,), generator=torch.Generator().manual_seed(0))
    model = GPT(tiny_config("attention", dropout=0.3)).train(training)
    sampler = BatchSampler(data[:1800], data[1800:], block_size=12, batch_size=4, device="cpu", seed=0)
    state = sampler.generator.get_state()
    losses = evaluate(model, sampler, eval_iters=3)
    assert model.training == training
    sampler.generator.set_state(state)  # the same draws, one batch after another, in eval mode (no dropout)
    model.eval()
    expected = {split: statistics.fmean(model(*sampler.get(split))[1].item() for _ in range(3))
                for split in ("train", "val")}
    assert losses == pytest.approx(expected, rel=1e-6)
    assert losses["train"] != pytest.approx(losses["val"], rel=1e-4)  # so a mix-up of the splits shows


@pytest.mark.parametrize("script,flag", [("gpt.py", "--out_dir"), ("pyg-gpt.py", "--data"), ("sample.py", "--out_dir"),
                                         ("evaluate.py", "--out_dir"), ("plot_attention.py", "--out"),
                                         ("compare.py", "--runs"), ("compare.py", "--out"), ("compare.py", "--data")])
def test_an_empty_path_is_refused_not_read_as_the_current_directory_or_the_default(script, flag, monkeypatch,
                                                                                   tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        if script.endswith("gpt.py"):
            main(GPT_SCRIPT if script == "gpt.py" else PYG_GPT, [f"{flag}="])
        else:
            __import__(script.removesuffix(".py")).main([f"{flag}=", *(["--out_dir", "run"] * (flag != "--out_dir"))])
    assert stop.value.code == 2
    prog, err = capsys.readouterr().err.split(": ", 1)
    assert err == f"error: argument {flag}: the path is empty; give a path (see --help)\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["pyg-gpt.py", "--gat_version", "GATv3Conv"], "error: unknown --gat_version"),
    (["gpt.py", "--n_embd", "many"], "error: argument --n_embd: invalid int value: 'many' (see --help)"),
    (["bigram.py", "--n_embd", "64"], "error: unrecognized arguments: --n_embd 64 (see --help)"),
    (["gpt.py", "--pos", "xyz"], "error: argument --pos: invalid choice: 'xyz' (choose from 'abs', 'rel')"),
    (["gpt.py", "--graph", "window:\u00b2"], "error: --graph 'window:\u00b2': W must be an integer from 1"),
    (["bigram.py", "--graph", "window:4"], "error: unrecognized arguments: --graph window:4 (see --help)"),
    (["gpt.py", "--exact_at", "0"], "error: argument --exact_at: '0' is not a comma-separated list of positive steps"),
    (["gpt.py", "--exact_at", "2,x"], "error: argument --exact_at: '2,x' is not a comma-separated list of positive "
                                      "steps"),
    (["gpt.py", "--exact_at", "4,2,4"], "error: argument --exact_at: '4,2,4' names a step twice; give each once"),
    (["gpt.py", "--n_layer", "1", "--graph", "window:2,full"], "error: --graph 'window:2,full' lists 2 graphs for 1 "
                                                               "layer; give one graph\n"),
])
def test_script_errors_exit_2_without_traceback(args, message, tmp_path):
    result = run_script(args, tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


HUGE = "99999999999999999999"  # past every C integer that a size or a count ends up in


@pytest.mark.parametrize("script,argv,flag", [
    ("gpt.py", ["--batch_size", HUGE], "--batch_size"),
    ("pyg-gpt.py", ["--n_layer", HUGE], "--n_layer"),
    ("bench.py", ["--iters", HUGE], "--iters"),
    ("bench.py", ["--gen_repeats", HUGE], "--gen_repeats"),
    ("sample.py", ["--out_dir", "run", "--num_samples", HUGE], "--num_samples"),
    ("evaluate.py", ["--out_dir", "run", "--random_estimates", HUGE], "--random_estimates"),
    ("compare.py", ["--models", "gpt", "--seeds", HUGE], "--seeds"),
    ("compare.py", ["--models", "gpt", "--jobs", HUGE], "--jobs"),
])
def test_a_count_past_2_31_is_refused_in_one_line(script, argv, flag, in_tmp_path, tiny_text_file, capsys):
    import bench
    import compare
    import evaluate
    import sample
    mains = {"gpt.py": lambda a: main(GPT_SCRIPT, a), "pyg-gpt.py": lambda a: main(PYG_GPT, a),
             "bench.py": bench.main, "sample.py": sample.main, "evaluate.py": evaluate.main, "compare.py": compare.main}
    assert mains[script](["--data", "tiny.txt", *argv] if script.endswith("gpt.py") else argv) == 2
    assert capsys.readouterr().err == f"error: {flag} must be at most 2**31 - 1, got {HUGE}\n"
    assert sorted(p.name for p in in_tmp_path.iterdir()) == ["tiny.txt"]


@pytest.mark.parametrize("argv,hint", [
    (["--learning_rate", "-1e-3"], "; pass a negative number as --learning_rate=-1e-3"),
    (["--learning_rate", "2e-3", "--learning_rate", "-1e-3"], "; pass a negative number as --learning_rate=-1e-3"),
    (["--learning_rate", "1e-3", "--learning_rate"], ""),  # no value at all
    (["--out_dir", "-x"], ""),  # a flag after all
])
def test_a_negative_number_taken_for_a_flag_gets_the_way_to_pass_it(argv, hint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpt.py"])
    with pytest.raises(SystemExit) as stop:
        build_parser(GPT_SCRIPT).parse_args(argv)
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"gpt.py: error: argument {argv[0]}: expected one argument{hint} (see --help)\n"


@pytest.mark.parametrize("script", ["pyg-gpt.py", "gpt.py", "bigram.py"])
def test_help_documents_every_flag(script, tmp_path):
    result = run_script([script, "--help"], tmp_path)
    assert result.returncode == 0
    flags = ["--batch_size", "--block_size", "--max_iters", "--eval_interval", "--eval_iters",
             "--learning_rate", "--seed", "--device", "--data", "--out_dir", "--preset"]
    flags += ["--resume", "--overwrite", "--compile", "--dtype", "--wandb_log", "--wandb_project", "--wandb_run_name",
              "--tensorboard", "pip install wandb tensorboard"]
    if script != "bigram.py":
        flags += ["--n_embd", "--n_head", "--n_layer", "--dropout"]
    if script == "pyg-gpt.py":
        flags += ["--gat_version", "--gnn", "--gnn_kwargs", "--list_layers", "--backend"]
    for flag in flags:
        assert flag in result.stdout


PRINTS_A_MEGABYTE = ("import sys; from gnngpt.errors import exit_code; "
                     "sys.exit(exit_code(lambda: [print('x' * 1023) for _ in range(1024)] and None))")


def test_output_to_a_pipe_whose_reader_left_ends_quietly_as_a_pipeline_writer_does():
    child = subprocess.Popen([sys.executable, "-c", PRINTS_A_MEGABYTE], cwd=Path(__file__).parents[1],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout.read(10) == b"x" * 10
    child.stdout.close()  # as head does after its lines
    assert (child.wait(timeout=60), child.stderr.read()) == (141, b"")


def test_output_to_a_full_disk_is_one_line_and_a_closed_output_no_error(tiny_text_file, tmp_path):
    root = Path(__file__).parents[1]
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-c", PRINTS_A_MEGABYTE], cwd=root, stdout=full,
                                stderr=subprocess.PIPE, text=True, timeout=60)
        assert (result.returncode, result.stderr) == (1, "error: could not write the output (No space left on "
                                                         "device); free disk space\n")
        training = subprocess.run([sys.executable, "gpt.py", "--data", str(tiny_text_file), "--out_dir",
                                   str(tmp_path / "run"), *TINY_GPT_RUN, "--max_iters", "2"], cwd=root, stdout=full,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
    assert training.returncode == 1
    assert training.stderr.splitlines()[-1] == ("error: could not write the output (No space left on device); free "
                                                "disk space")
    closed = subprocess.run(f"{shlex.quote(sys.executable)} -c \"{PRINTS_A_MEGABYTE}\" >&-", shell=True, cwd=root,
                            stderr=subprocess.PIPE, text=True, timeout=60)
    assert (closed.returncode, closed.stderr) == (0, "")


@pytest.mark.parametrize("flag,problem", [
    ("--out_dir", "--out_dir {long} has a name longer than the {limit} bytes its file system allows; choose another "
                  "--out_dir"),
    ("--data", "{long}: File name too long; choose a shorter path"),
])
def test_a_path_too_long_for_the_file_system_is_bad_input_in_one_line(flag, problem, tiny_text_file, tmp_path,
                                                                      capsys):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    long = tmp_path / ("a" * (limit + 1))
    paths = {"--data": str(tiny_text_file), "--out_dir": str(tmp_path / "run"), flag: str(long)}
    assert main(GPT_SCRIPT, [*(a for item in paths.items() for a in item), *TINY_GPT_RUN, "--max_iters", "2"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {problem.format(long=long, limit=limit)}"
    assert list(tmp_path.iterdir()) == [tiny_text_file]  # no run directory


def test_a_failed_atomic_write_that_reaches_the_top_names_its_file(tmp_path, capsys):
    def full(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    assert exit_code(atomic_write, tmp_path / "results.md", full) == 1
    assert capsys.readouterr().err == (f"error: could not write {tmp_path / 'results.md'} (No space left on device); "
                                       f"free disk space\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["pyg-gpt.py", "gpt.py", "bigram.py", "compare.py", "sample.py", "bench.py",
                                    "evaluate.py", "plot_attention.py"])
def test_ctrl_c_while_a_script_imports_torch_ends_in_one_line(script, tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise KeyboardInterrupt  # Ctrl-C in the seconds of the import\n")
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert (result.returncode, result.stderr, result.stdout) == (130, "interrupted\n", "")
    imported = subprocess.run([sys.executable, "-c", f"import runpy; runpy.run_path({str(ROOT / script)!r})"],
                              capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert "KeyboardInterrupt" in imported.stderr  # imported, not run: the Ctrl-C goes on to the importer


def test_memory_running_out_in_training_or_in_the_layer_guard_is_one_line_naming_the_sizes(tiny_text_file, tmp_path,
                                                                                          monkeypatch, capsys):
    args = ["--data", str(tiny_text_file), "--out_dir", str(tmp_path / "out"), *TINY_GPT]
    monkeypatch.setattr("gnngpt.train.Trainer.train_step", allocation_fails)
    assert main(GPT_SCRIPT, args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: the model and batch do not fit in memory "
                                                        f"({ALLOCATION_ERROR}); train again with a lower --batch_size, "
                                                        f"--block_size, --n_embd or --n_layer and --overwrite")
    failed = []

    def allocation_fails_here(*args, **kwargs):
        failed.append(True)
        allocation_fails()

    with monkeypatch.context() as m:  # under torchrun, a rank other than 0 that runs out alone says so too
        m.setattr("gnngpt.train.Trainer.train_step", allocation_fails_here)
        m.setattr(cli.distributed, "is_main_process", lambda: not failed)  # rank 0 until then, as far as it goes
        assert main(GPT_SCRIPT, [*args, "--overwrite"]) == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith("error: the model and batch do not fit in memory ")
    assert main(BIGRAM_SCRIPT, ["--data", str(tiny_text_file), "--out_dir", str(tmp_path / "bigram"), *TINY]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: the model and batch do not fit in memory "
                                                        f"({ALLOCATION_ERROR}); train again with a lower --batch_size "
                                                        f"or --block_size and --overwrite")
    monkeypatch.setattr("gnngpt.guard.build_conv", allocation_fails)
    assert main(PYG_GPT, ["--gat_version", "GATConv", *args, "--overwrite"]) == 2
    assert capsys.readouterr().err == (f"error: the model and batch do not fit in memory ({ALLOCATION_ERROR}); lower "
                                       f"--n_embd, or the layer's sizes in --gnn_kwargs\n")
    probed = guard.refusal_reason(GPTConfig(**guard.SUPPORT_SIZES, mixer="GATConv"))  # as --list_layers probes each
    assert probed == f"cannot be built: {ALLOCATION_ERROR}"  # a reason of that layer's, the listing goes on
    monkeypatch.undo()
    assert main(PYG_GPT, ["--gat_version", "GATv2Conv", *args, "--overwrite", "--n_embd", "2147483646"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (  # too big for torch to count its bytes
        "error: the model and batch do not fit in memory (Storage size calculation overflowed with sizes="
        "[2147483646, 2147483646]); lower --n_embd, or the layer's sizes in --gnn_kwargs")

    def other_failure(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr("gnngpt.train.Trainer.train_step", other_failure)
    with pytest.raises(RuntimeError, match="a bug"):  # not taken for memory running out
        main(GPT_SCRIPT, [*args, "--overwrite"])


def run_with_stdout_closed(script, *args):
    """script run with args in a shell that closed its standard output (>&-), as a user can."""
    return subprocess.run(["sh", "-c", '"$@" >&-', "sh", sys.executable, str(ROOT / script), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script,argv,what", [(SAMPLE_SCRIPT, [], "the samples"),
                                              (EVALUATE_SCRIPT, ["--out_dir", "none"], "the result"),
                                              (BENCH_SCRIPT, [], "the benchmark's tables")])
def test_a_script_whose_product_is_its_output_refuses_a_closed_stdout_before_any_work(script, argv, what):
    result = run_with_stdout_closed(script, *argv)
    assert (result.returncode, result.stderr) == (
        2, f"error: standard output is closed, and {what} would be printed there; send it to a file (> FILE) instead "
           f"of closing it (>&-)\n")


def test_evaluate_write_records_the_result_with_stdout_closed(tmp_path, tiny_text_file):
    assert train_tiny_gpt(tmp_path / "run", tiny_text_file, "--max_iters", "2") == 0
    (tmp_path / "run" / "eval.json").unlink()
    result = run_with_stdout_closed(EVALUATE_SCRIPT, "--out_dir", str(tmp_path / "run"), "--write")
    assert result.returncode == 0 and "error" not in result.stderr  # which shows the progress bars alone
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["step"] == 2


def test_the_paper_preset_and_the_published_losses_are_the_originals():
    """As the original's scripts and README give them (the lecture's sizes; the losses read from its plot)."""
    assert PRESETS["paper"]["gpt"] == dict(batch_size=64, block_size=128, max_iters=5000, eval_interval=50,
                                           eval_iters=200, learning_rate=3e-4, n_embd=384, n_head=6, n_layer=6,
                                           dropout=0.2)
    assert PRESETS["paper"]["bigram"] == dict(batch_size=32, block_size=128, max_iters=5001, eval_interval=50,
                                              eval_iters=200, learning_rate=1e-2)
    assert PUBLISHED_VAL_LOSS == {"bigram": 2.47, "gpt": 1.50, "GATConv": 1.65, "GATv2Conv": 1.57}
    assert (SEED, PUBLISHED_STEP) == (1337, 5000)


@pytest.mark.parametrize("device,preset", [("cuda", "paper"), ("mps", "cpu"), ("cpu", "cpu")])
def test_the_auto_preset_is_the_papers_on_cuda_alone_and_a_named_one_stays(device, preset):
    assert resolve_preset("auto", torch.device(device)) == preset
    assert [resolve_preset(name, torch.device(device)) for name in ("paper", "cpu")] == ["paper", "cpu"]


def test_the_seed_decides_a_runs_weights_and_batches(tmp_path, tiny_text_file):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert train_tiny_gpt(tmp_path / name, tiny_text_file, "--max_iters", "2", "--eval_interval", "1",
                              "--seed", seed) == 0
    weights = {name: torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"] for name in "abc"}
    metrics = {name: (tmp_path / name / "metrics.csv").read_text().splitlines() for name in "abc"}
    assert all(torch.equal(weights["a"][key], weights["b"][key]) for key in weights["a"])
    assert not torch.equal(weights["a"]["token_embedding.weight"], weights["c"]["token_embedding.weight"])
    losses = {name: [row.split(",")[1:3] for row in rows[1:]] for name, rows in metrics.items()}
    assert losses["a"] == losses["b"] and losses["a"][1] != losses["c"][1]
