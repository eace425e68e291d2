import json

import pytest
import torch

import bench
from gnngpt.config import PRESETS

FIELDS = {"model", "backend", "preset", "device", "ms_per_iter", "tokens_per_s", "peak_mem_mb"}


def test_bench_prints_a_table_and_json_rows_for_every_model(capsys):
    assert bench.main(["--preset", "cpu", "--device", "cpu", "--iters", "1", "--warmup", "0", "--gen_repeats", "1",
                       "--json"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    train = [r for r in rows if r["task"] == "train"]
    assert [(r["model"], r["backend"]) for r in train] == bench.MODELS
    for r in train:
        assert FIELDS <= set(r) and (r["preset"], r["device"], r["dtype"]) == ("cpu", "cpu", "float32")
        assert r["ms_per_iter"] > 0 and r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0
    generation = [r for r in rows if r["task"] == "generate"]
    assert [(r["model"], r["backend"]) for r in generation] == bench.GENERATION_MODELS
    for r in generation:
        assert r["speedup"] == round(r["full_ms"] / r["cached_ms"], 2)
        assert r["cached_chars_per_s"] == pytest.approx(r["chars"] / r["cached_ms"] * 1e3, abs=0.1)
    ms = {(r["model"], r["backend"]): r["ms_per_iter"] for r in train}
    ratio_lines = out.split("| ratio | measured |\n| --- | --- |\n")[1].split("\n\n")[0].splitlines()
    printed = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in ratio_lines if line.startswith("|")}
    assert printed["GATConv fast speed-up over pyg"] == pytest.approx(
        ms["GATConv", "pyg"] / ms["GATConv", "fast"], abs=0.006)
    assert "GATv2Conv fast peak memory / pyg" in printed
    assert "target" not in out  # measurements and ratios only: the targets live in the docs


def test_no_mixer_model_predicts_each_token_from_itself_alone():
    model = bench.build("no-mixer", "-", PRESETS["cpu"]["gpt"], torch.device("cpu")).eval()
    x = torch.randint(bench.VOCAB_SIZE, (1, 16))
    y = x.clone()
    y[0, 5] = (x[0, 5] + 1) % bench.VOCAB_SIZE
    changed = (model(x)[0] - model(y)[0]).abs().amax(-1)[0]
    assert changed[5] > 0 and changed[:5].eq(0).all() and changed[6:].eq(0).all()


def test_bench_refuses_bad_counts(capsys):
    assert bench.main(["--iters", "0"]) == 2
    assert capsys.readouterr().err == "error: --iters must be a positive integer, got 0\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_refuses_bfloat16_without_cuda(capsys):
    assert bench.main(["--device", "cpu", "--dtype", "bfloat16"]) == 2
    assert capsys.readouterr().err == ("error: --dtype bfloat16 needs a CUDA GPU with bf16 support; "
                                       "use --dtype float32 here\n")
