import io
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import sample
from conftest import (
    ALLOCATION_ERROR,
    CACHE_ERROR,
    CAPTURE_ERROR,
    MULTINOMIAL_ERROR,
    allocation_fails,
    assert_cached_decoding_equals_full,
    build_fails,
    capture_that_raises,
    cuda_graph_warning,
    failing_cache,
    failing_multinomial,
    write_tiny_text,
)
from gnngpt.checkpoint import load_checkpoint, save_checkpoint
from gnngpt.cli import main
from gnngpt.config import BIGRAM as BIGRAM_SCRIPT
from gnngpt.decoder import KVCache
from gnngpt.results import load_run_model

ROOT = Path(__file__).resolve().parents[1]


def run_sample(capsys, *args):
    """sample.py's samples (prompt included) for args, from its output split at the separator lines."""
    capsys.readouterr()
    assert sample.main(list(args)) == 0
    return capsys.readouterr().out.split(f"\n{sample.SEPARATOR}\n")[:-1]


def bigram_pairs(samples, tokenizer):
    """Every (previous token, next token) pair of the samples."""
    return [pair for s in samples for pair in zip(tokenizer.encode(s), tokenizer.encode(s)[1:])]


def test_same_seed_same_samples_other_seed_other_samples(tiny_run, capsys):
    args = ["--out_dir", str(tiny_run("gpt")), "--prompt", "To be", "--num_samples", "3", "--max_new_tokens", "40"]
    first = run_sample(capsys, *args, "--seed", "7")
    assert run_sample(capsys, *args, "--seed", "7") == first
    assert run_sample(capsys, *args, "--seed", "8") != first


def test_start_is_the_prompt_as_in_nanogpt_file_included(tiny_run, tmp_path, capsys):
    args = ["--out_dir", str(tiny_run("gpt")), "--num_samples", "2", "--max_new_tokens", "10"]
    expected = run_sample(capsys, *args, "--prompt", "To be")
    assert all(s.startswith("To be") for s in expected)
    assert run_sample(capsys, *args, "--start", "To be") == expected
    (tmp_path / "prompt.txt").write_text("To be", encoding="utf-8")
    assert run_sample(capsys, *args, "--start", f"FILE:{tmp_path / 'prompt.txt'}") == expected


@pytest.mark.parametrize("name", ["bigram", "gpt", "GATConv", "GATv2Conv"])
def test_num_samples_continue_the_prompt_in_the_vocabulary(name, tiny_run, capsys):
    run = tiny_run(name)
    samples = run_sample(capsys, "--out_dir", str(run), "--prompt", "Is the", "--num_samples", "4",
                         "--max_new_tokens", "25", "--device", "cpu")
    _, tokenizer, _ = load_run_model(run)
    assert len(samples) == 4
    for s in samples:
        assert s.startswith("Is the") and len(s) == len("Is the") + 25
        assert not tokenizer.unknown(s)
    assert len(set(samples)) > 1  # the samples are drawn independently


@pytest.mark.parametrize("name", ["gpt", "GATv2Conv"])
def test_a_prompt_longer_than_the_context_is_printed_whole_before_its_continuation(name, tiny_run, capsys):
    prompt = "to be or not that is the question whether"  # 42 characters, against block_size 16
    samples = run_sample(capsys, "--out_dir", str(tiny_run(name)), "--prompt", prompt, "--num_samples", "2",
                         "--max_new_tokens", "25")
    assert len(samples) == 2 and all(s.startswith(prompt) and len(s) == len(prompt) + 25 for s in samples)


def test_top_k_at_or_past_the_vocabulary_leaves_every_token_and_k_below_it_leaves_k():
    from gnngpt.sampling import next_token_probs

    logits = torch.randn(3, 17, generator=torch.Generator().manual_seed(0))
    for top_k in (17, 200):  # sample.py's default top_k is larger than the vocabulary
        assert torch.equal(next_token_probs(logits, 0.8, top_k), torch.softmax(logits / 0.8, dim=-1))
    assert ((next_token_probs(logits, 1.0, 16) > 0).sum(dim=-1) == 16).all()


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no cache"])
def test_zero_new_tokens_return_the_prompt_and_one_adds_one(use_cache, tiny_run):
    from gnngpt.sampling import generate

    model, _, _ = load_run_model(tiny_run("gpt"))
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(generate(model, idx, 0, use_cache=use_cache), idx)
    grown = generate(model, idx, 1, use_cache=use_cache)
    assert grown.shape == (1, 6) and torch.equal(grown[:, :5], idx)


def test_samples_the_output_cannot_encode_are_refused_in_one_line_with_nothing_printed(tmp_path, monkeypatch,
                                                                                     capsys):
    data = write_tiny_text(tmp_path / "tiny.txt")
    data.write_text(data.read_text(encoding="utf-8") + "Un café.\n", encoding="utf-8")
    assert main(BIGRAM_SCRIPT, ["--max_iters", "1", "--eval_interval", "1", "--eval_iters", "1", "--device", "cpu",
                                "--data", str(data), "--out_dir", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    written = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(written, encoding="ascii"))
    assert sample.main(["--out_dir", str(tmp_path / "run"), "--prompt", "café", "--max_new_tokens", "5"]) == 2
    sys.stdout.flush()
    assert written.getvalue() == b""
    assert capsys.readouterr().err == ("error: the output's encoding, ascii, cannot write 'é', a character of the "
                                       "samples; set PYTHONIOENCODING=utf-8\n")


@pytest.mark.parametrize("args", [["--top_k", "1"], ["--temperature", "1e-3"]])
def test_top_k_1_and_near_zero_temperature_give_the_greedy_continuation(args, tiny_run, capsys):
    run = tiny_run("gpt")
    model, tokenizer, _ = load_run_model(run)
    idx = torch.tensor([tokenizer.encode("Not")])
    with torch.no_grad():
        for _ in range(12):  # 3 + 12 tokens stay within the context of 16
            idx = torch.cat((idx, model(idx)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    greedy = tokenizer.decode(idx[0].tolist())
    for seed in ("1", "2"):
        samples = run_sample(capsys, "--out_dir", str(run), "--prompt", "Not", "--num_samples", "3",
                             "--max_new_tokens", "12", "--seed", seed, *args)
        assert samples == [greedy] * 3


@pytest.mark.parametrize("name", ["gpt", "GATConv", "GATv2Conv"])
def test_greedy_text_is_the_same_with_and_without_the_cache_over_three_windows(name, tiny_run, capsys):
    run = tiny_run(name)  # block_size 16
    args = ["--out_dir", str(run), "--prompt", "To", "--num_samples", "2", "--max_new_tokens", "50", "--top_k", "1"]
    cached = run_sample(capsys, *args)
    assert len(cached[0]) == 52
    assert run_sample(capsys, *args, "--no_cache") == cached
    model, tokenizer, _ = load_run_model(run)  # greedy text soon repeats itself: the logits of a varied one too
    tokens = torch.randint(0, len(tokenizer.chars), (50, 1, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_cached_decoding_equals_full(model, torch.tensor([tokenizer.encode("To")]), tokens)


def test_a_capture_that_raises_warns_once_and_samples_what_no_cache_samples(tiny_run, capture_anywhere, capsys):
    args = ["--out_dir", str(tiny_run("GATConv")), "--prompt", "To", "--num_samples", "2", "--max_new_tokens", "40"]
    capsys.readouterr()
    assert sample.main([*args, "--no_cache"]) == 0
    expected = capsys.readouterr().out
    capture_anywhere(capture_that_raises)
    assert sample.main(args) == 0
    fallback = capsys.readouterr()
    assert fallback.out == expected and len(fallback.out) > 80
    assert fallback.err == cuda_graph_warning(CAPTURE_ERROR)


def test_a_failure_while_sampling_ends_with_one_line_and_exit_code_1(tiny_run, monkeypatch, capsys):
    args = ["--out_dir", str(tiny_run("gpt")), "--num_samples", "1", "--max_new_tokens", "5"]
    monkeypatch.setattr(KVCache, "begin", failing_cache)
    capsys.readouterr()
    assert sample.main(args) == 1
    assert capsys.readouterr() == ("", f"error: sampling failed (RuntimeError: {CACHE_ERROR}); "
                                       "--no_cache samples without the cached decoder, which raised it\n")
    assert sample.main([*args, "--no_cache"]) == 0  # which does not decode with a CachedDecoder

    monkeypatch.setattr("gnngpt.sampling.torch.multinomial", failing_multinomial)
    capsys.readouterr()
    assert sample.main([*args, "--no_cache"]) == 1
    assert capsys.readouterr() == ("", f"error: sampling failed (RuntimeError: {MULTINOMIAL_ERROR})\n")


def test_the_lowest_temperature_samples_the_most_likely_character_as_top_k_1_does(tiny_run, capsys):
    args = ["--out_dir", str(tiny_run("gpt")), "--num_samples", "2", "--max_new_tokens", "30"]
    capsys.readouterr()
    assert sample.main([*args, "--top_k", "1"]) == 0
    greedy = capsys.readouterr().out
    assert sample.main([*args, "--top_k", "0", "--temperature", str(sample.MIN_TEMPERATURE)]) == 0
    assert capsys.readouterr().out == greedy


def test_compile_without_a_cache_names_the_fast_backend_only_where_the_layer_has_a_dense_form(tiny_run, tmp_path,
                                                                                              capsys):
    run = shutil.copytree(tiny_run("GATConv"), tmp_path / "mean")
    checkpoint = load_checkpoint(run / "ckpt.pt")
    checkpoint["model_config"]["mixer_kwargs"] = {"aggr": "mean"}  # no softmax sum: the dense form cannot compute it
    save_checkpoint(run / "ckpt.pt", checkpoint)
    capsys.readouterr()
    assert sample.main(["--out_dir", str(run), "--compile"]) == 2
    assert capsys.readouterr().err == (f"error: --compile compiles the cached decoder's one-token step, and the "
                                       f"GATConv model of {run} samples without the cache; drop --compile\n")


def test_memory_running_out_while_sampling_says_to_draw_fewer_or_shorter_samples(tiny_run, monkeypatch, capsys):
    run = tiny_run("gpt")  # trained first, should this test run alone: its training samples too
    monkeypatch.setattr("gnngpt.sampling.torch.multinomial", allocation_fails)
    capsys.readouterr()
    assert sample.main(["--out_dir", str(run), "--num_samples", "3", "--max_new_tokens", "5"]) == 2
    assert capsys.readouterr() == ("", f"error: sampling does not fit in memory ({ALLOCATION_ERROR}); draw fewer "
                                       f"samples at once (--num_samples 3) or shorter ones (--max_new_tokens 5)\n")


def test_a_decoder_step_that_fails_to_build_under_compile_says_to_sample_without_it(tiny_run, monkeypatch, capsys):
    run = tiny_run("gpt")
    monkeypatch.setattr("gnngpt.cli.compiler_available", lambda: True)  # the build fails, whether or not g++ is here
    monkeypatch.setattr("gnngpt.decoder.compiled", lambda function, **options: build_fails)
    capsys.readouterr()
    assert sample.main(["--out_dir", str(run), "--max_new_tokens", "5", "--compile"]) == 1
    assert capsys.readouterr() == ("", "error: torch.compile could not compile the cached decoder's one-token step "
                                       "(RuntimeError: C++ compile error); sample without --compile\n")


def test_ctrl_c_while_sampling_ends_with_one_line_and_exit_code_130(tiny_run, monkeypatch, capsys):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    run = tiny_run("gpt")  # trained first, should this test run alone: its sampling is not the one interrupted
    monkeypatch.setattr("gnngpt.sampling.torch.multinomial", interrupt)
    capsys.readouterr()
    assert sample.main(["--out_dir", str(run), "--num_samples", "1", "--max_new_tokens", "5"]) == 130
    assert capsys.readouterr() == ("", "interrupted\n")


@pytest.mark.parametrize("name", ["GATConv", "GATv2Conv", "TransformerConv"])
def test_either_backend_samples_the_same_text_from_one_checkpoint(name, tiny_run, capsys):
    run = tiny_run(name)  # trained with the fast backend
    args = ["--out_dir", str(run), "--prompt", "To", "--num_samples", "3", "--max_new_tokens", "14"]  # 16 tokens
    fast = run_sample(capsys, *args)
    assert run_sample(capsys, *args, "--backend", "pyg") == fast
    assert run_sample(capsys, *args, "--backend", "fast") == fast
    pyg, tokenizer, _ = load_run_model(run, backend="pyg")
    assert not any(b.mixer.dense for b in pyg.blocks)
    idx = torch.tensor([tokenizer.encode("To be or not tha")])  # the text above is too short a check: a trained
    with torch.no_grad():  # two steps, the model's logits are nearly flat, and samples would hide a wrong backend
        expected, _ = pyg(idx)
        logits, _ = load_run_model(run, backend="fast")[0](idx)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_top_k_samples_only_among_the_k_most_likely(tiny_run, capsys):
    run = tiny_run("bigram")
    model, tokenizer, _ = load_run_model(run)
    table = model.token_embedding_table.weight  # row a: the logits of the token after a
    samples = run_sample(capsys, "--out_dir", str(run), "--prompt", "T", "--num_samples", "20",
                         "--max_new_tokens", "30", "--top_k", "3", "--temperature", "2")
    pairs = bigram_pairs(samples, tokenizer)
    top3 = table.topk(3, dim=-1).indices
    assert all(b in top3[a] for a, b in pairs)
    assert any(b != top3[a][0] for a, b in pairs)  # not only the most likely one


def test_temperature_flattens_or_sharpens_the_distribution(tiny_run, capsys):
    run = tiny_run("bigram")
    model, tokenizer, _ = load_run_model(run)
    most_likely = model.token_embedding_table.weight.argmax(-1)

    def share_not_most_likely(temperature):
        samples = run_sample(capsys, "--out_dir", str(run), "--prompt", "T", "--num_samples", "20",
                             "--max_new_tokens", "30", "--top_k", "0", "--temperature", temperature)
        pairs = bigram_pairs(samples, tokenizer)
        return sum(b != most_likely[a] for a, b in pairs) / len(pairs)

    cold, warm, hot = share_not_most_likely("0.01"), share_not_most_likely("1"), share_not_most_likely("100")
    assert cold == 0 and cold < warm < hot


def test_prompt_from_a_file(tiny_run, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text("To be or\nnot", encoding="utf-8")
    samples = run_sample(capsys, "--out_dir", str(tiny_run("gpt")), "--prompt", f"FILE:{tmp_path / 'prompt.txt'}",
                         "--num_samples", "1", "--max_new_tokens", "5")
    assert samples[0].startswith("To be or\nnot")


def write_foreign_checkpoints(tmp_path):
    (tmp_path / "foreign").mkdir()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign" / "ckpt.pt")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "ckpt.pt").write_text("not a checkpoint")
    (tmp_path / "latin1.txt").write_bytes("àé".encode("latin-1"))


@pytest.mark.parametrize("args,message", [
    (["--out_dir", "missing"], "error: no checkpoint at missing/ckpt.pt"),
    (["--out_dir", "foreign"], "error: foreign/ckpt.pt is not a checkpoint of this project"),
    (["--out_dir", "text"], "error: text/ckpt.pt is not a readable checkpoint of this project"),
    (["--prompt", "ROMEO: To be!"], "error: the prompt has characters outside the model's vocabulary: "
                                    "'R' 'M' 'E' ':' '!'; give a --prompt made of characters of the training text"),
    (["--prompt", ""], "error: the prompt is empty"),
    (["--prompt", "FILE:"], "error: --prompt FILE: names no file; give --prompt FILE:PATH to a UTF-8 text file\n"),
    (["--prompt", "FILE:nowhere.txt"], "error: cannot read the prompt file nowhere.txt (No such file or directory)"),
    (["--prompt", "FILE:latin1.txt"], "error: cannot read the prompt file latin1.txt (not UTF-8 text)"),
    (["--num_samples", "0"], "error: --num_samples must be a positive integer, got 0"),
    (["--max_new_tokens", "-1"], "error: --max_new_tokens must be a positive integer, got -1"),
    (["--temperature", "0"], "error: --temperature must be a positive number, got 0.0"),
    (["--temperature", "inf"], "error: --temperature must be a positive number, got inf"),
    (["--temperature", "1e-31"], "error: --temperature must be at least 1e-30, got 1e-31 (the logits divided by it "
                                 "can overflow); --top_k 1 always takes the most likely character\n"),
    (["--top_k", "-2"], "error: --top_k must be 0 (no limit) or a positive integer, got -2"),
    (["--compile", "--no_cache"], "error: --compile compiles the cached decoder's one-token step, which --no_cache "
                                  "does not run; drop one of them\n"),
    (["--compile", "--backend", "pyg", "--out_dir", "{GATConv}"], "error: --compile compiles the cached decoder's "
                                                                  "one-token step, and the GATConv model of {GATConv} "
                                                                  "on --backend pyg samples without the cache; drop "
                                                                  "--compile, or sample with --backend fast\n"),
    (["--compile", "--out_dir", "{bigram}"], "error: --compile compiles the cached decoder's one-token step, and the "
                                             "bigram model of {bigram} samples without the cache; drop --compile\n"),
    (["--seed", str(2**64)], f"error: --seed must be an integer from 0 to 2**63 - 1, got {2**64}"),
    (["--backend", "fast"], "error: --backend applies to runs of GATConv, GATv2Conv and TransformerConv (the layers "
                            "with a dense form), and {gpt} holds a gpt model; drop --backend\n"),
    (["--backend", "fast", "--out_dir", "{GCNConv}"], "error: --backend applies to runs of GATConv, GATv2Conv and "
                                                      "TransformerConv (the layers with a dense form), and {GCNConv} "
                                                      "holds a GCNConv model; drop --backend\n"),
])
def test_bad_input_gives_one_line_error(args, message, tiny_run, tmp_path, monkeypatch, capsys):
    write_foreign_checkpoints(tmp_path)
    monkeypatch.chdir(tmp_path)
    runs = {name: str(tiny_run(name)) for name in ("gpt", "GATConv", "GCNConv", "bigram")}  # trained first,
    capsys.readouterr()  # should this test run alone: their output is not the error's
    assert sample.main(["--out_dir", runs["gpt"], "--num_samples", "1", *(a.format(**runs) for a in args)]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(message.format(**runs))
    assert captured.out == ""


def test_a_default_prompt_outside_the_vocabulary_says_to_give_one(tmp_path, capsys):
    (tmp_path / "line.txt").write_text("to be or not to be " * 200)  # no newline, sample.py's default prompt
    out = tmp_path / "bigram"
    assert main(BIGRAM_SCRIPT, ["--data", str(tmp_path / "line.txt"), "--out_dir", str(out), "--max_iters", "2",
                                "--eval_iters", "1", "--batch_size", "2", "--block_size", "8", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert sample.main(["--out_dir", str(out)]) == 2
    assert capsys.readouterr().err == ("error: the prompt has characters outside the model's vocabulary: '\\n'; give "
                                       "a --prompt made of characters of the training text\n")


@pytest.mark.parametrize("change,message", [
    (lambda c: c["model"].pop("lm_head.weight"),
     'holds a model this version cannot rebuild (Error(s) in loading state_dict for GPT: Missing key(s) in state_dict: '
     '"lm_head.weight"'),
    (lambda c: c["model"].update({"lm_head.weight": torch.zeros(3, 3)}),
     "holds a model this version cannot rebuild (Error(s) in loading state_dict for GPT: size mismatch"),
    (lambda c: c["model_config"].update(n_kv_head=1), "holds a model this version cannot rebuild ("),
    (lambda c: c["model_config"].update(n_embd="16"), "holds a model this version cannot rebuild (n_head 2 does not "
                                                      "divide n_embd '16'); retrain it with this version"),
    (lambda c: c["model_config"].update(graph="window:x"), "holds a model this version cannot rebuild (--graph "
                                                           "'window:x': W must be an integer"),
    (lambda c: c["model_config"].update(n_head=0), "holds a model this version cannot rebuild (n_head 0 does not "
                                                   "divide n_embd 16); retrain it with this version"),
    (lambda c: c["model"]["lm_head.weight"].view(-1)[3].fill_(math.nan),
     "holds weights that are not finite numbers (NaN or infinity); retrain it, at a lower --learning_rate if its loss "
     "diverged"),
    (lambda c: c.pop("step"), "is not a checkpoint of this project"),
    (lambda c: c.update(step="x"), "is not a checkpoint of this project"),
    (lambda c: c.update(step=-5), "is not a checkpoint of this project"),
])
@pytest.mark.parametrize("script", [sample, evaluate])
def test_a_checkpoint_this_version_cannot_rebuild_gives_one_line_error(change, message, script, tiny_run, tmp_path,
                                                                      capsys):
    run = tiny_run("gpt")
    checkpoint = load_checkpoint(run / "ckpt.pt")
    change(checkpoint)
    other = tmp_path / "other"
    shutil.copytree(run, other)
    save_checkpoint(other / "ckpt.pt", checkpoint)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    capsys.readouterr()
    assert script.main(["--out_dir", str(other), "--write" if script is evaluate else "--num_samples=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {other / 'ckpt.pt'} {message}"), err
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


def test_script_fails_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--out_dir", "nowhere"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == ("error: no checkpoint at nowhere/ckpt.pt; train a model first or point --out_dir at "
                             "a finished run\n")
