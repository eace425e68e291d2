import json

import pytest
import torch

import bench
from gnngpt.config import PRESETS

from conftest import assert_cached_decoding_equals_full

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
    decoders = [r for r in generation if r["model"] != "no-mixer"]
    assert all(r["speedup"] == round(r["full_ms"] / r["cached_ms"], 2) for r in decoders)
    assert "| GATv2Conv fast speed-up over pyg |" in out and "| GATv2Conv fast peak memory / pyg |" in out
    assert "| GATConv pyg time / no-mixer time: the most any GATConv backend can gain over pyg |" in out
    (floor,) = [r for r in generation if r["model"] == "no-mixer"]
    assert floor["full_ms"] is None and floor["speedup"] is None and "| no-mixer - | " in out
    for r in decoders:
        line = f"| {r['model']} full generation time / no-mixer cached time: about the most a cache can gain here |"
        measured = next(row for row in out.splitlines() if row.startswith(line)).split("|")[2]
        assert float(measured) == pytest.approx(r["full_ms"] / floor["cached_ms"], abs=0.006)
    assert "| no-mixer cached generation speed-up |" not in out


def test_no_mixer_model_predicts_each_token_from_itself_alone():
    model = bench.build("no-mixer", "-", PRESETS["cpu"]["gpt"], torch.device("cpu")).eval()
    x = torch.randint(bench.VOCAB_SIZE, (1, 16))
    y = x.clone()
    y[0, 5] = (x[0, 5] + 1) % bench.VOCAB_SIZE
    changed = (model(x)[0] - model(y)[0]).abs().amax(-1)[0]
    assert changed[5] > 0 and changed[:5].eq(0).all() and changed[6:].eq(0).all()


def test_no_mixer_model_decodes_with_the_cache_as_it_computes_in_full():
    model = bench.build("no-mixer", "-", PRESETS["cpu"]["gpt"], torch.device("cpu")).eval()
    assert model.supports_cache  # so generate() times its cached decoding, the floor bench.py compares with
    tokens = torch.randint(bench.VOCAB_SIZE, (70, 1, 1))  # past the window of 64
    assert_cached_decoding_equals_full(model, torch.zeros((1, 1), dtype=torch.long), tokens)


def test_bench_refuses_bad_counts(capsys):
    assert bench.main(["--iters", "0"]) == 2
    assert capsys.readouterr().err == "error: --iters must be a positive integer, got 0\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_refuses_bfloat16_without_cuda(capsys):
    assert bench.main(["--device", "cpu", "--dtype", "bfloat16"]) == 2
    assert capsys.readouterr().err == "error: --dtype bfloat16 needs a CUDA GPU with bf16 support; use --dtype float32 here\n"
