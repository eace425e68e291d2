import json
from types import SimpleNamespace

import pytest
import torch

import bench
from conftest import ALLOCATION_ERROR, allocation_fails, build_fails
from gnngpt import benchmark
from gnngpt.config import PRESETS

FIELDS = {"model", "backend", "graph", "pos", "preset", "device", "block_size", "batch_size", "ms_per_iter",
          "tokens_per_s", "peak_mem_mb"}
TINY = ["--device", "cpu", "--block_size", "16", "--batch_size", "2", "--n_embd", "16", "--n_head", "2",
        "--n_layer", "2", "--iters", "1", "--warmup", "0", "--json"]


def run_bench(capsys, *args):
    """bench.py's printed output, its JSON rows and its ratio table as {description: value}."""
    assert bench.main([*TINY, *args]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    ratio_lines = out.split("| ratio | measured |\n| --- | --- |\n")[1].splitlines()
    ratios = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in ratio_lines if line.startswith("|")}
    return out, rows, ratios


def test_bench_times_every_model_on_every_graph_and_prints_their_ratios(capsys):
    out, rows, ratios = run_bench(capsys, "--graphs", "full,window:4", "--gen_repeats", "0")
    train = [r for r in rows if r["task"] == "train"]
    graphed = [(m, b) for m, b in benchmark.MODELS if m not in benchmark.GRAPHLESS]
    expected = [*benchmark.MODELS, *graphed]  # the graphless bigram and no-mixer once, the others on each graph
    assert [(r["model"], r["backend"]) for r in train] == expected
    assert [r["graph"] for r in train] == ["-", *["full"] * 7, "-", *["window:4"] * 7]
    for r in train:
        assert FIELDS <= set(r) and (r["preset"], r["device"], r["dtype"], r["block_size"], r["batch_size"]) == (
            "cpu", "cpu", "float32", 16, 2)
        assert r["ms_per_iter"] > 0 and r["peak_mem_mb"] > 0
        step_ms = r["ms_per_iter"]  # rounded to 0.01: tokens a step (batch 2 x block 16) over a time within that
        assert 2 * 16e3 / (step_ms + 0.005) - 0.05 <= r["tokens_per_s"] <= 2 * 16e3 / (step_ms - 0.005) + 0.05
        assert r["pos"] == ("-" if r["graph"] == "-" else "abs")
    ms = {(r["model"], r["backend"], r["graph"]): r for r in train}
    assert ratios["GATConv pyg time / no-mixer time: the most any GATConv backend can gain over pyg [full abs]"] \
        == pytest.approx(ms["GATConv", "pyg", "full"]["ms_per_iter"] / ms["no-mixer", "-", "-"]["ms_per_iter"],
                         abs=0.006)
    assert ratios["GATv2Conv fast on window:4 abs / on full abs: tokens per second"] == pytest.approx(
        ms["GATv2Conv", "fast", "window:4"]["tokens_per_s"] / ms["GATv2Conv", "fast", "full"]["tokens_per_s"],
        abs=0.006)
    assert ratios["GATConv fast speed-up over pyg [window:4 abs]"] == pytest.approx(
        ms["GATConv", "pyg", "window:4"]["ms_per_iter"] / ms["GATConv", "fast", "window:4"]["ms_per_iter"], abs=0.006)
    assert ratios["GATv2Conv fast on window:4 abs / on full abs: peak memory"] == pytest.approx(
        ms["GATv2Conv", "fast", "window:4"]["peak_mem_mb"] / ms["GATv2Conv", "fast", "full"]["peak_mem_mb"], abs=0.006)
    assert "GATv2Conv fast peak memory / pyg [full abs]" in ratios
    assert ratios["TransformerConv fast speed-up over pyg [full abs]"] == pytest.approx(
        ms["TransformerConv", "pyg", "full"]["ms_per_iter"] / ms["TransformerConv", "fast", "full"]["ms_per_iter"],
        abs=0.006)
    assert "TransformerConv fast peak memory / pyg [full abs]" in ratios
    assert not [r for r in rows if r["task"] == "generate"] and "generate" not in out
    assert "target" not in out  # measurements and ratios only: the targets live in the docs
    assert "where a step's time goes" not in out and not any("profiled_ms" in r for r in train)


def test_bench_prints_no_ratio_table_where_nothing_compares(capsys):
    assert bench.main([*TINY, "--models", "gpt", "--gen_repeats", "0"]) == 0
    out = capsys.readouterr().out
    assert "| gpt | - | full | abs |" in out and "ratio" not in out


def test_bench_gives_relative_against_absolute_positions_for_every_model_on_every_graph(capsys):
    out, rows, ratios = run_bench(capsys, "--models", "gpt,GATv2Conv/fast,TransformerConv/fast", "--pos", "abs,rel",
                                  "--graphs", "full,window:4", "--gen_repeats", "0")
    train = {(r["model"], r["graph"], r["pos"]): r for r in rows if r["task"] == "train"}
    for model, backend in (("gpt", "-"), ("GATv2Conv", "fast"), ("TransformerConv", "fast")):
        for graph in ("full", "window:4"):
            rel, ab = train[model, graph, "rel"], train[model, graph, "abs"]
            where = f"{model} {backend} [{graph}], relative / absolute positions"
            assert ratios[f"{where}: step time"] == pytest.approx(rel["ms_per_iter"] / ab["ms_per_iter"], abs=0.006)
            assert ratios[f"{where}: peak memory"] == pytest.approx(rel["peak_mem_mb"] / ab["peak_mem_mb"], abs=0.006)


def test_bench_times_cached_and_lectures_generation_with_the_models_it_is_given(capsys):
    out, rows, ratios = run_bench(capsys, "--models", "gpt,GATv2Conv/fast", "--pos", "rel", "--graphs", "window:3",
                                  "--gen_length", "40", "--gen_repeats", "1")
    assert [(r["model"], r["backend"], r["pos"]) for r in rows if r["task"] == "train"] == [
        ("gpt", "-", "rel"), ("GATv2Conv", "fast", "rel")]
    generation = [r for r in rows if r["task"] == "generate"]
    assert [(r["model"], r["backend"], r["graph"]) for r in generation] == [("gpt", "-", "window:3"),
                                                                           ("GATv2Conv", "fast", "window:3")]
    for r in generation:
        assert r["chars"] == 40 and r["speedup"] == round(r["full_ms"] / r["cached_ms"], 2)
        assert r["cached_chars_per_s"] == pytest.approx(40 / r["cached_ms"] * 1e3, abs=0.1)
        assert 0 < r["cached_first_fifth_ms"] < r["cached_ms"] and 0 < r["cached_last_fifth_ms"] < r["cached_ms"]
        assert ratios[f"{r['model']} {r['backend']} [window:3 rel]: cached generation, last fifth / first fifth"] \
            == pytest.approx(r["cached_last_fifth_ms"] / r["cached_first_fifth_ms"], abs=0.006)


def test_bench_profiles_where_each_models_step_spends_its_time(capsys):
    out, rows, _ = run_bench(capsys, "--models", "bigram,gpt,TransformerConv,no-mixer", "--gen_repeats", "0",
                             "--profile_steps", "2")
    spent = {(r["model"], r["backend"]): r for r in rows}
    for r in spent.values():
        assert r["profiled_ms"] >= r["matmul_ms"] + r["sdpa_ms"]
        assert f"| {r['model']} {r['backend']} | {r['graph']} | {r['pos']} | {r['profiled_ms']:.1f} | " \
               f"{r['matmul_ms']:.1f} | {r['sdpa_ms']:.1f} | " in out
    assert spent["bigram", "-"]["matmul_ms"] == spent["bigram", "-"]["sdpa_ms"] == 0  # an embedding lookup alone
    assert spent["no-mixer", "-"]["matmul_ms"] > 0 and spent["no-mixer", "-"]["sdpa_ms"] == 0
    for attends in (("gpt", "-"), ("TransformerConv", "fast")):
        assert spent[attends]["matmul_ms"] > 0 and spent[attends]["sdpa_ms"] > 0
    assert spent["TransformerConv", "pyg"]["sdpa_ms"] == 0  # message passing: gathers and scatters


def test_bench_profiles_cpu_time_alone(monkeypatch, capsys):
    monkeypatch.setattr(bench, "resolve_device", lambda name: torch.device("cuda"))
    assert bench.main([*TINY, "--profile_steps", "1"]) == 2
    assert capsys.readouterr().err == ("error: --profile_steps measures CPU time, which on cuda is not the step's "
                                       "time; profile with --device cpu\n")


def test_no_mixer_model_predicts_each_token_from_itself_alone():
    model = benchmark.build("no-mixer", "-", PRESETS["cpu"]["gpt"], torch.device("cpu")).eval()
    x = torch.randint(benchmark.VOCAB_SIZE, (1, 16))
    y = x.clone()
    y[0, 5] = (x[0, 5] + 1) % benchmark.VOCAB_SIZE
    changed = (model(x)[0] - model(y)[0]).abs().amax(-1)[0]
    assert changed[5] > 0 and changed[:5].eq(0).all() and changed[6:].eq(0).all()


@pytest.mark.parametrize("args,message", [
    (["--iters", "0"], "--iters must be a positive integer, got 0"),
    (["--block_size", "-4"], "--block_size must be a positive integer, got -4"),
    (["--gen_repeats", "-1"], "--gen_repeats must be zero or more, got -1"),
    (["--profile_steps", "-2"], "--profile_steps must be zero or more, got -2"),
    (["--models", "gpt,GATv3Conv"], "--models: unknown model 'GATv3Conv'; choose among bigram, gpt, GATConv"),
    (["--graphs", "window:0"], "--graphs 'window:0': W must be an integer from 1 to 2147483647, got '0' (in window:W)"),
    (["--graphs", "[window:2,full]", "--n_layer", "3"], "--graphs '[window:2,full]' lists 2 graphs for 3 layers"),
    (["--models", "gpt,GATConv,gpt"], "--models 'gpt,GATConv,gpt' names gpt twice; give each once\n"),
    (["--models", "gpt,"], "--models 'gpt,' has an empty item; remove the extra comma\n"),
    (["--models", "GATConv,GATConv/pyg"], "--models 'GATConv,GATConv/pyg' names GATConv/pyg twice; give each once\n"),
    (["--graphs", "window:2,window:02"], "--graphs 'window:2,window:02' with --pos 'abs' names window:2 with abs "
                                         "positions twice; give each once\n"),
    (["--pos", "abs,absolute"], "--pos 'abs,absolute': give abs, rel or abs,rel"),
    (["--graphs", "full@rel,window:2@pos"], "--graphs entry 'window:2@pos': after @ give abs or rel, as in full@abs"),
    (["--n_embd", "30", "--n_head", "4"], "n_embd 30 is not divisible by n_head 4"),
    (["--models", "bigram,no-mixer", "--graphs", "window:4"], "--graphs and --pos place a token mixer, and --models "
                                                              "bigram,no-mixer has none"),
])
def test_bench_refuses_bad_input_with_one_line(args, message, capsys):
    assert bench.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_a_shape_that_does_not_fit_in_memory_is_one_line_naming_what_to_lower(monkeypatch, capsys):
    monkeypatch.setattr(benchmark.TrainingBench, "step", allocation_fails)
    assert bench.main([*TINY, "--models", "gpt"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: the benchmark's training does not fit in the memory of cpu ({ALLOCATION_ERROR}); lower "
        "--batch_size, --block_size or --n_embd, or leave the "
        "pyg backends, whose memory grows with the square of the block, out of --models")
    monkeypatch.undo()

    monkeypatch.setattr(benchmark, "time_generation", allocation_fails)
    assert bench.main([*TINY, "--models", "gpt", "--gen_repeats", "1"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: the benchmark's generation does not fit in the memory of cpu ({ALLOCATION_ERROR}); lower "
        "--gen_length, --block_size or --n_embd, or skip "
        "generation with --gen_repeats 0")


def test_kernels_that_fail_to_build_under_compile_are_one_line(monkeypatch, capsys):
    from torch._dynamo.exc import BackendCompilerFailed

    monkeypatch.setattr("gnngpt.cli.compiler_available", lambda: True)  # the build fails, whether or not g++ is here
    monkeypatch.setattr(benchmark, "compiled", lambda model: model)
    monkeypatch.setattr(benchmark.TrainingBench, "step", build_fails)
    assert bench.main([*TINY, "--models", "gpt", "--compile"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == ("error: torch.compile could not compile the benchmark's models "
                                                        "(RuntimeError: C++ compile error); benchmark them without "
                                                        "--compile")
    with pytest.raises(BackendCompilerFailed):  # without --compile it is not ours to explain
        bench.main([*TINY, "--models", "gpt"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_refuses_bfloat16_without_cuda(capsys):
    assert bench.main(["--device", "cpu", "--dtype", "bfloat16"]) == 2
    assert capsys.readouterr().err == ("error: --dtype bfloat16 needs a CUDA GPU with bf16 support; "
                                       "use --dtype float32 here\n")


SETTINGS = dict(PRESETS["cpu"]["gpt"], block_size=16, batch_size=2, n_embd=16, n_head=2, n_layer=1, graph="full",
                pos="abs")


def test_peak_memory_on_the_cpu_is_the_same_each_time_and_the_profiler_prints_nothing(capfd):
    bench_ = benchmark.TrainingBench("GATConv", "fast", dict(SETTINGS, n_layer=2), torch.device("cpu"), "float32",
                                     False)
    bench_.step()  # gradients and optimizer state from a step before, as in bench.py
    assert bench_.peak_memory_mb() == bench_.peak_memory_mb() > 0
    assert capfd.readouterr().err == ""


def train_row(model, backend, graph, pos, ms, tokens_per_s, memory):
    return {"model": model, "backend": backend, "graph": graph, "pos": pos, "ms_per_iter": ms,
            "tokens_per_s": tokens_per_s, "peak_mem_mb": memory}


def test_each_ratio_divides_the_measurements_it_names():
    rows = [train_row("no-mixer", "-", "-", "-", 4.0, 500.0, 1.0),
            train_row("gpt", "-", "full", "abs", 5.0, 400.0, 2.0),
            train_row("GATConv", "fast", "full", "abs", 10.0, 100.0, 1.0),
            train_row("GATConv", "pyg", "full", "abs", 40.0, 25.0, 4.0),
            train_row("GATConv", "fast", "full", "rel", 15.0, 60.0, 1.5),
            train_row("GATConv", "pyg", "full", "rel", 80.0, 12.5, 8.0),
            train_row("GATConv", "fast", "window:4", "abs", 8.0, 150.0, 3.0),
            train_row("GATConv", "fast", "window:4", "rel", 12.0, 90.0, 2.0)]
    generation = [{"model": "gpt", "backend": "-", "graph": "full", "pos": "abs", "cached_first_fifth_ms": 10.0,
                   "cached_last_fifth_ms": 30.0}]
    assert dict(benchmark.ratios(rows, generation)) == pytest.approx({
        "GATConv fast speed-up over pyg [full abs]": 40 / 10,
        "GATConv fast time / gpt time [full abs]": 10 / 5,
        "GATConv fast peak memory / pyg [full abs]": 1 / 4,
        "GATConv pyg time / no-mixer time: the most any GATConv backend can gain over pyg [full abs]": 40 / 4,
        "GATConv fast speed-up over pyg [full rel]": 80 / 15,
        "GATConv fast peak memory / pyg [full rel]": 1.5 / 8,
        "GATConv pyg time / no-mixer time: the most any GATConv backend can gain over pyg [full rel]": 80 / 4,
        "GATConv fast on window:4 abs / on full abs: tokens per second": 150 / 100,
        "GATConv fast on window:4 abs / on full abs: peak memory": 3 / 1,
        "GATConv fast on window:4 rel / on full rel: tokens per second": 90 / 60,
        "GATConv fast on window:4 rel / on full rel: peak memory": 2 / 1.5,
        "GATConv fast [full], relative / absolute positions: step time": 15 / 10,
        "GATConv fast [full], relative / absolute positions: peak memory": 1.5 / 1,
        "GATConv pyg [full], relative / absolute positions: step time": 80 / 40,
        "GATConv pyg [full], relative / absolute positions: peak memory": 8 / 4,
        "GATConv fast [window:4], relative / absolute positions: step time": 12 / 8,
        "GATConv fast [window:4], relative / absolute positions: peak memory": 2 / 3,
        "gpt - [full abs]: cached generation, last fifth / first fifth": 30 / 10})


def test_training_times_the_steps_after_the_untimed_warm_up_and_reports_their_median(monkeypatch):
    calls = []
    monkeypatch.setattr(benchmark.TrainingBench, "step", lambda bench: calls.append(len(bench.times)))
    monkeypatch.setattr(benchmark.TrainingBench, "peak_memory_mb", lambda bench: 3.0)
    clock = iter([0.0, 0.001, 1.0, 1.009, 2.0, 2.002])  # three timed steps of 1, 9 and 2 ms
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    (row,) = benchmark.bench_training([("gpt", "-", SETTINGS)], torch.device("cpu"), "float32", False, warmup=2,
                                      iters=3, common={})
    assert calls == [0, 0, 0, 1, 2]  # two warm-up steps before any timed one, then three timed
    assert row["ms_per_iter"] == pytest.approx(2.0)  # the median: the mean would be 4
    assert row["tokens_per_s"] == pytest.approx(2 * 16 / 2.0e-3) and row["peak_mem_mb"] == 3.0


def test_a_generation_is_timed_over_all_its_characters_and_its_first_and_last_fifth(monkeypatch):
    now = 0.0

    def tokens(model, start, length, use_cache, compile):
        nonlocal now
        for i in range(length):
            now = float((i + 1) ** 2)  # the clock when character i + 1 is out
            yield i

    monkeypatch.setattr(benchmark, "sample_tokens", tokens)
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: now))
    # ten characters: the first fifth ends with the 2nd (4 s), the last fifth starts after the 8th (64 s)
    assert benchmark.time_generation(None, torch.device("cpu"), True, 10, False) == (100.0, 4.0, 36.0)


def test_generation_rows_are_the_medians_of_the_timed_rounds_cached_and_with_the_lectures_sampler(monkeypatch):
    rounds = {True: iter([(50.0, 5.0, 5.0), (0.1, 0.01, 0.03), (0.5, 0.02, 0.09), (0.2, 0.04, 0.05)]),
              False: iter([(90.0, 9.0, 9.0), (0.9, 0.2, 0.2), (1.2, 0.2, 0.2), (0.6, 0.2, 0.2)])}  # untimed first
    monkeypatch.setattr(benchmark, "time_generation",
                        lambda model, device, cached, length, compiled: next(rounds[cached]))
    settings = dict(SETTINGS, models=[("gpt", "-")])
    (row,) = benchmark.bench_generation([settings], torch.device("cpu"), 40, 3, {}, False)
    assert {key: row[key] for key in ("cached_ms", "full_ms", "cached_first_fifth_ms", "cached_last_fifth_ms",
                                      "cached_chars_per_s", "full_chars_per_s", "speedup")} == pytest.approx(
        {"cached_ms": 200.0, "full_ms": 900.0, "cached_first_fifth_ms": 20.0, "cached_last_fifth_ms": 50.0,
         "cached_chars_per_s": 40 / 0.2, "full_chars_per_s": round(40 / 0.9, 1), "speedup": 4.5})


def test_a_profiled_step_splits_its_self_cpu_time_into_matrix_products_attention_and_the_rest(monkeypatch):
    events = [SimpleNamespace(key=key, self_cpu_time_total=us) for key, us in (
        ("aten::mm", 2000.0), ("aten::addmm", 4000.0), ("aten::bmm", 1000.0), ("aten::softmax", 500.0),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", 3000.0), ("aten::add", 1500.0))]

    class Profile:
        def __enter__(self):
            return SimpleNamespace(key_averages=lambda: events)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(benchmark, "cpu_profile", Profile)
    monkeypatch.setattr(benchmark.TrainingBench, "step", lambda bench: None)
    bench_ = benchmark.TrainingBench("gpt", "-", SETTINGS, torch.device("cpu"), "float32", False)
    assert bench_.time_spent(2) == {"profiled_ms": 6.0, "matmul_ms": 3.5, "sdpa_ms": 1.5}  # per step, of 2


def test_the_tables_print_each_rows_own_columns(capsys):
    row = dict(train_row("gpt", "-", "full", "abs", 2.5, 12345.0, 3.0), profiled_ms=10.0, matmul_ms=3.0, sdpa_ms=2.0)
    benchmark.print_tables([row], [], 0, False)
    out = capsys.readouterr().out
    assert "| gpt | - | full | abs | 2.5 | 12,345 | 3.0 |" in out
    assert "| gpt - | full | abs | 10.0 | 3.0 | 2.0 | 5.0 |" in out
