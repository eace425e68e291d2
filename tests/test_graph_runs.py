"""Context graphs and positions end to end: the flags, what runs store, and everything that rebuilds a model."""
import csv
import json
import os
import shutil

import matplotlib.image
import numpy
import pytest
import torch

import compare
import sample
from conftest import TINY_SIZES, t_interval
from gnngpt.checkpoint import load_checkpoint
from gnngpt.cli import main
from gnngpt.config import GPT as GPT_SCRIPT, PYG_GPT
from gnngpt.graph import parse_graph
from gnngpt.results import load_run_model, offset_ranges, run_summary

TINY = ["--max_iters", "4", "--eval_interval", "2", "--eval_iters", "1", "--batch_size", "2", "--block_size", "16",
        "--device", "cpu", *TINY_SIZES]


@pytest.mark.parametrize("script,extra,name", [
    (PYG_GPT, ["--gat_version", "GATv2Conv"], "GATv2Conv_window-3+dilated-2-2_rel"),
    (GPT_SCRIPT, [], "gpt_window-3+dilated-2-2_rel"),
])
def test_a_run_stores_its_graph_and_positions_and_every_reader_rebuilds_the_same_model(script, extra, name,
                                                                                        in_tmp_path, tiny_text_file,
                                                                                        capsys):
    args = [*TINY, *extra, "--data", str(tiny_text_file), "--graph", "window:3,dilated:2:2", "--pos", "rel"]
    assert main(script, args) == 0
    run = in_tmp_path / "runs" / name  # the default directory is named after graph and positions
    config = json.loads((run / "config.json").read_text())
    assert (config["settings"]["graph"], config["settings"]["pos"]) == ("window:3,dilated:2:2", "rel")
    checkpoint = load_checkpoint(run / "ckpt.pt")
    assert (checkpoint["model_config"]["graph"], checkpoint["model_config"]["pos"]) == ("window:3,dilated:2:2", "rel")
    assert (run / "sample.txt").is_file()

    model, _, _ = load_run_model(run)
    assert model.graphs == parse_graph("window:3,dilated:2:2", 2) and model.position_embedding is None
    model.load_state_dict(checkpoint["model"])  # the same parameters, none missing or left over
    capsys.readouterr()
    assert sample.main(["--out_dir", str(run), "--prompt", "To", "--num_samples", "1", "--max_new_tokens", "40",
                        "--top_k", "1"]) == 0
    cached = capsys.readouterr().out
    assert sample.main(["--out_dir", str(run), "--prompt", "To", "--num_samples", "1", "--max_new_tokens", "40",
                        "--top_k", "1", "--no_cache"]) == 0
    assert capsys.readouterr().out == cached

    resume = [*args, "--out_dir", str(run), "--resume", "--max_iters", "6"]
    for changed, message in ((["--graph", "full"], "graph was window:3,dilated:2:2, now full"),
                             (["--pos", "abs"], "pos was rel, now abs")):
        assert main(script, [*resume, *changed]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: cannot resume {run}/ckpt.pt: ") and message in err
    assert main(script, resume) == 0
    assert load_checkpoint(run / "ckpt.pt")["step"] == 6


def test_compare_runs_every_model_on_every_graph_and_reuses_them(in_tmp_path, tiny_text_file, capsys):
    argv = ["--data", str(tiny_text_file), *TINY, "--models", "bigram,gpt,GATConv", "--graphs",
            "full,[window:2,full]", "--pos", "abs,rel"]
    assert compare.main(argv) == 0
    names = ["bigram", "gpt", "gpt_rel", "gpt_window-2+full", "gpt_window-2+full_rel", "GATConv", "GATConv_rel",
             "GATConv_window-2+full", "GATConv_window-2+full_rel"]
    assert sorted(p.parent.name for p in (in_tmp_path / "runs").glob("*/config.json")) == \
        sorted(f"{name}_s1337" for name in names)
    table = (in_tmp_path / "runs" / "graphs.md").read_text()  # --out is --runs unless given
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    rows = rows[:len(names)]  # the study's table; the paired differences follow
    for model, graph, pos, edges, loss, *_ in (map(str.strip, row) for row in rows):
        name = "bigram" if model == "bigram" else "_".join(
            p for p in [model, "" if graph == "full" else "window-2+full", "" if pos == "abs" else "rel"] if p)
        exact = json.loads((in_tmp_path / "runs" / f"{name}_s1337" / "eval.json").read_text())
        assert loss == f"{exact['val_loss']:.4f} (1)"
        assert edges == {"-": "-", "full": "8.5", "window:2,full": "5.2"}[graph]  # (1.9 + 8.5) / 2 at block 16
    assert sorted(row[0].strip() for row in rows) == sorted(["bigram"] + ["gpt"] * 4 + ["GATConv"] * 4)
    assert "| GATConv_window-2+full_rel | GATConv_rel | " in table  # against the complete graph
    assert "| GATConv_window-2+full_rel | GATConv_window-2+full | " in table  # against absolute positions
    assert "| GATConv_window-2+full_rel | gpt_window-2+full_rel | " in table  # against gpt
    image = matplotlib.image.imread(in_tmp_path / "runs" / "graphs.png")
    assert image.ndim == 3 and image.shape[1] > 1000
    assert not (in_tmp_path / "runs" / "val_loss.png").exists()  # a graph study leaves the comparison's plot alone
    assert not (in_tmp_path / "plots").exists()  # nor the shipped figures

    capsys.readouterr()
    assert compare.main(argv) == 0
    assert capsys.readouterr().out.count("reusing the finished run") == len(names)


def test_a_graph_named_with_its_positions_trains_with_those_alone(in_tmp_path, tiny_text_file):
    argv = ["--data", str(tiny_text_file), *TINY, "--models", "gpt", "--graphs", "full@abs,[window:2,full]@rel,full",
            "--pos", "rel", "--seeds", "2"]
    assert compare.main(argv) == 0
    runs = in_tmp_path / "runs"
    names = ["gpt", "gpt_rel", "gpt_window-2+full_rel"]
    assert sorted(p.parent.name for p in runs.glob("*/config.json")) == \
        sorted(f"{name}_s{seed}" for name in names for seed in (1337, 1338))
    table = (runs / "graphs.md").read_text()
    assert "| gpt_rel | gpt | " in table and "| gpt_window-2+full_rel | gpt_rel | " in table

    # every run reaches the highest of their last validation estimates; rebuilt with it as the target
    metrics = {run.name: list(csv.DictReader((run / "metrics.csv").open())) for run in runs.glob("gpt*")}
    target = max(float(rows[-1]["val_loss"]) for rows in metrics.values())
    assert compare.main([*argv, "--report_only", "--target_loss", str(target), "--jobs", "2"]) == 0
    text = (runs / "graphs.md").read_text()
    assert "trained at once" not in text  # they trained one at a time, whatever --jobs the report is given
    table = text.split("training seconds to a validation loss")[1]

    def seconds(name, seed):
        return next(float(r["train_s"]) for r in metrics[f"{name}_s{seed}"] if float(r["val_loss"]) <= target)

    for name, against in (("gpt_rel", "gpt"), ("gpt_window-2+full_rel", "gpt_rel")):
        d = numpy.array([seconds(name, seed) - seconds(against, seed) for seed in (1337, 1338)])
        low, high = t_interval(d)
        assert f"| {name} | {against} | {d.mean():+.1f} [{low:+.1f}, {high:+.1f}] (2) | " in table


@pytest.mark.parametrize("block_size, ranges", [
    (128, [(0, 4), (4, 8), (8, 16), (16, 64), (64, 128)]),
    (16, [(0, 4), (4, 8), (8, 16)]),
    (6, [(0, 3), (3, 4), (4, 6)]),
    (1, [(0, 1)]),
])
def test_offset_ranges_cover_every_offset_once(block_size, ranges):
    assert offset_ranges(block_size) == ranges


def test_the_loss_by_position_of_a_graph_study_comes_from_the_run_files_alone(in_tmp_path, tiny_text_file):
    argv = ["--data", str(tiny_text_file), *TINY, "--block_size", "32", "--models", "gpt", "--graphs",
            "full@abs,window:2@rel", "--seeds", "2"]
    assert compare.main(argv) == 0
    runs = in_tmp_path / "runs"

    def columns(table):
        lines = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
        header = [cell.strip() for cell in lines[0]]
        rows = [dict(zip(header, map(str.strip, line))) for line in lines[2:4]]
        return {(row["graph"], row["positions"]): (row["at offsets 8–15"], row["at the window's second half"])
                for row in rows}

    def weighted(rows, start, end):
        return sum(float(r["loss"]) * int(r["targets"]) for r in rows[start:end]) / \
            sum(int(r["targets"]) for r in rows[start:end])

    table = (runs / "graphs.md").read_text()
    for name, key in (("gpt", ("full", "abs")), ("gpt_window-2_rel", ("window:2", "rel"))):
        curves = [list(csv.DictReader((runs / f"{name}_s{seed}" / "loss_by_position.csv").open()))
                  for seed in (1337, 1338)]
        assert [len(curve) for curve in curves] == [32, 32]  # block 32: offsets 0 to 31
        assert columns(table)[key] == tuple(f"{numpy.mean([weighted(c, a, b) for c in curves]):.4f}"
                                            for a, b in ((8, 16), (16, 32)))
    assert "- at offsets 8–15, at the window's second half: the exact validation loss of the targets at offsets 8 to " \
           "15 of their window (9 to 16 characters of context: the target at offset t is predicted from the t + 1 " \
           "characters up to it), and at 16 to 31 (block_size / 2" in table

    def curve(name, seed):
        return list(csv.DictReader((runs / f"{name}_s{seed}" / "loss_by_position.csv").open()))

    assert "| configuration | against | offsets 0–3 | offsets 4–7 | offsets 8–15 | offsets 16–31 |" in table
    cells = []
    for a, b in ((0, 4), (4, 8), (8, 16), (16, 32)):  # paired by seed with the original, gpt on full@abs
        d = numpy.array([weighted(curve("gpt_window-2_rel", seed), a, b) - weighted(curve("gpt", seed), a, b)
                         for seed in (1337, 1338)])
        low, high = t_interval(d)
        cells.append(f"{d.mean():+.4f} [{low:+.4f}, {high:+.4f}] (2)")
    assert f"| gpt_window-2_rel | gpt | {' | '.join(cells)} |" in table
    # with no complete graph of relative positions, the window is paired with the original in nats as well
    exact = {name: [json.loads((runs / f"{name}_s{seed}" / "eval.json").read_text())["val_loss"]
                    for seed in (1337, 1338)] for name in ("gpt", "gpt_window-2_rel")}
    d = numpy.subtract(exact["gpt_window-2_rel"], exact["gpt"])
    low, high = t_interval(d)
    assert f"| gpt_window-2_rel | gpt | {d.mean():+.4f} [{low:+.4f}, {high:+.4f}] (2) | " in table
    figure = (runs / "graphs_by_position.png").read_bytes()
    assert matplotlib.image.imread(runs / "graphs_by_position.png").ndim == 3

    for path in [*runs.glob("*/ckpt.pt"), runs / "graphs.md", runs / "graphs_by_position.png"]:
        path.unlink()
    assert compare.main([*argv, "--report_only"]) == 0
    assert (runs / "graphs.md").read_text() == table
    assert (runs / "graphs_by_position.png").read_bytes() == figure

    (runs / "gpt_window-2_rel_s1338" / "loss_by_position.csv").unlink()  # as in runs from before it was written
    assert compare.main([*argv, "--report_only"]) == 0
    table = (runs / "graphs.md").read_text()
    assert columns(table)[("window:2", "rel")] == ("n/a", "n/a")
    assert columns(table)[("full", "abs")] != ("n/a", "n/a")
    assert "- n/a: gpt_window-2_rel has runs without loss_by_position.csv" in table
    assert "Loss by offset in the window" not in table  # nothing left to pair with the baseline
    assert "`graphs_by_position.png`: the exact validation loss at each offset of the windows, mean over seeds; " \
           "without gpt_window-2_rel, whose runs have no readable loss_by_position.csv." in table

    assert (runs / "graphs_by_position.png").is_file()
    for path in runs.glob("*/loss_by_position.csv"):  # a study from before any run wrote it
        path.unlink()
    assert compare.main([*argv, "--report_only"]) == 0
    table = (runs / "graphs.md").read_text()
    assert "at offsets 8–15" not in table and "No loss by position: no run has loss_by_position.csv" in table
    assert not (runs / "graphs_by_position.png").exists()  # the figure of the runs as they were is gone with it


def test_a_study_is_reported_as_it_was_at_an_earlier_step(in_tmp_path, tiny_text_file, capsys):
    argv = ["--data", str(tiny_text_file), *TINY, "--models", "gpt", "--graphs", "full@abs,window:2@rel"]
    assert compare.main([*argv, "--exact_at", "2"]) == 0
    runs = in_tmp_path / "runs"
    assert compare.main([*argv, "--report_only", "--report_step", "2", "--out", "at2"]) == 0
    table = (in_tmp_path / "at2" / "graphs.md").read_text()
    for name in ("gpt", "gpt_window-2_rel"):
        snapshot = json.loads((runs / f"{name}_s1337" / "eval_step2.json").read_text())
        final = json.loads((runs / f"{name}_s1337" / "eval.json").read_text())
        assert snapshot["step"] == 2 and f"| {snapshot['val_loss']:.4f} (1) |" in table
        assert f"| {final['val_loss']:.4f} (1) |" in (runs / "graphs.md").read_text()
    assert "--report_only --report_step 2 --out at2`" in table  # the command that rebuilds it, as shown
    assert compare.main([*argv, "--report_only", "--report_step", "4", "--out", "at4"]) == 0  # the last: eval.json
    assert (in_tmp_path / "at4" / "graphs.md").read_text().split("\n", 3)[3] == \
        (runs / "graphs.md").read_text().split("\n", 3)[3]  # all but the command line

    (runs / "gpt_s1337" / "eval_step2.json").unlink()
    capsys.readouterr()
    assert compare.main([*argv, "--report_only", "--report_step", "2", "--out", "at2"]) == 2
    assert capsys.readouterr().err == ("error: --report_only needs every run finished with its eval_step2.json, and "
                                       "runs/gpt_s1337 (no eval_step2.json) is not; train them with --exact_at 2 among "
                                       "the training flags (a finished one keeps no earlier weights: delete its run "
                                       "directory first)\n")
    shutil.rmtree(runs / "gpt_s1337")  # as the message says
    assert compare.main([*argv, "--exact_at", "2"]) == 0
    assert compare.main([*argv, "--report_only", "--report_step", "2", "--out", "at2"]) == 0
    capsys.readouterr()
    assert compare.main([*argv, "--report_only", "--report_step", "3", "--out", "at3"]) == 2
    assert capsys.readouterr().err == ("error: --report_step 3 is not an evaluation step of runs/gpt_s1337 (every 2 "
                                       "steps, and the last); choose one of those\n")
    assert compare.main([*argv, "--report_only", "--report_step", "6", "--out", "at6"]) == 2
    assert capsys.readouterr().err == ("error: --report_step 6 is past the last step of runs/gpt_s1337 (4); choose a "
                                       "step up to it\n")
    assert not (in_tmp_path / "at6").exists()


@pytest.mark.parametrize("args,message", [
    (["--graph", "window:0"], "--graph 'window:0': W must be an integer from 1 to 2147483647, got '0' (in window:W)"),
    (["--graph", "ring:4"], "--graph 'ring:4': unknown graph 'ring'"),
    (["--graph", "window:2,window:3,full"], "--graph 'window:2,window:3,full' lists 3 graphs for 2 layers"),
])
@pytest.mark.parametrize("script", [PYG_GPT, GPT_SCRIPT], ids=["pyg-gpt", "gpt"])
def test_bad_graphs_exit_2_with_one_line_and_write_nothing(script, args, message, in_tmp_path, tiny_text_file,
                                                           capsys):
    before = set(in_tmp_path.iterdir())
    assert main(script, [*TINY, "--data", str(tiny_text_file), *args]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {err[7:]}" and err.count("\n") == 1 and message in err
    assert set(in_tmp_path.iterdir()) == before


@pytest.mark.parametrize("args,message", [
    (["--graphs", ","], "--graphs ',' names nothing; give a comma-separated list such as full,window:16\n"),
    (["--graphs", "[]"], "--graphs entry '[]' names no graph; give one, as in full@abs or [window:4,full]\n"),
    (["--graphs", "[window:2,,full]"], "--graphs 'window:2,,full' has an empty item; remove the extra comma\n"),
    (["--graphs", "window:2,window:02"], "--graphs 'window:2,window:02' with --pos 'abs' names window:2 with abs "
                                         "positions twice; give each once\n"),
    (["--graphs", "window:2,[window:2,window:2]"], "--graphs 'window:2,[window:2,window:2]' with --pos 'abs' names "
                                                   "window:2 with abs positions twice; give each once\n"),
    (["--pos", ""], "--pos '' names nothing; give a comma-separated list such as abs,rel\n"),
    (["--graphs", "full,[window:2,full"], "--graphs 'full,[window:2,full' has an unpaired bracket"),
    (["--graphs", "full,dilated:2"], "--graphs 'dilated:2': dilated takes 2 number(s)"),
    (["--graphs", "full,[window:2,full,full]"], "--graphs '[window:2,full,full]' lists 3 graphs for 2 layers; give one "
                                                "graph for every layer or one for each of the 2\n"),
    (["--graphs", "full,,window:2"], "--graphs 'full,,window:2' has an empty item; remove the extra comma\n"),
    (["--graphs", "full,[full]"], "--graphs 'full,[full]' with --pos 'abs' names full with abs positions twice; give "
                                  "each once\n"),
    (["--graphs", "full@rel,full", "--pos", "abs,rel"], "--graphs 'full@rel,full' with --pos 'abs,rel' names full "
                                                        "with rel positions twice; give each once\n"),
    (["--pos", "rel,rel"], "--pos 'rel,rel' names rel twice; give each once\n"),
    (["--pos", "abs,"], "--pos 'abs,' has an empty item; remove the extra comma\n"),
    (["--pos", "relative"], "--pos 'relative': give abs, rel or abs,rel"),
    (["--graphs", "full@relative"], "--graphs entry 'full@relative': after @ give abs or rel, as in full@abs"),
    (["--graphs", "window:2@"], "--graphs entry 'window:2@': after @ give abs or rel, as in full@abs"),
    (["--graphs", "full,@rel"], "--graphs entry '@rel' names no graph; give one, as in full@abs or [window:4,full]\n"),
])
def test_compare_refuses_bad_graphs_and_positions_before_training(args, message, in_tmp_path, tiny_text_file,
                                                                  capsys):
    assert compare.main(["--data", str(tiny_text_file), *TINY, "--models", "gpt", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (in_tmp_path / "runs").exists()


@pytest.mark.parametrize("layers,window", [(20, 123456), (24, 16)])  # the run's folder too long; its sample's link
def test_a_per_layer_graph_list_too_long_for_a_runs_names_is_refused_before_training(layers, window, in_tmp_path,
                                                                                     tiny_text_file, capsys):
    graphs = "[" + ",".join(f"window:{window + i % 2}" for i in range(layers)) + "]"  # gpt_window-16+... 243 bytes
    assert compare.main(["--data", str(tiny_text_file), *TINY, "--n_layer", str(layers), "--models", "gpt",
                         "--graphs", graphs]) == 2
    err, limit = capsys.readouterr().err, os.pathconf(in_tmp_path, "PC_NAME_MAX")
    assert err.startswith(f"error: the run gpt_window-{window}+window-{window + 1}+") and err.endswith(
        f"_s1337 would write names longer than the {limit} bytes its file system allows; shorten --graphs (a run's "
        f"name holds its graph, every layer's in a per-layer list)\n")
    assert not (in_tmp_path / "runs").exists()


@pytest.mark.parametrize("small", ["runs", "report"])  # the run's folder (9 bytes) or its sample's link (29 bytes)
def test_run_names_are_held_to_the_limit_of_the_file_system_they_are_written_on(small, in_tmp_path, tiny_text_file,
                                                                                monkeypatch, capsys):
    from gnngpt import plan

    limit = 8 if small == "runs" else 28
    monkeypatch.setattr(plan, "name_limit", lambda path: limit if path.name == small else 255)
    (in_tmp_path / small).mkdir()
    assert compare.main(["--data", str(tiny_text_file), *TINY, "--models", "gpt", "--out", "report/out"]) == 2
    assert capsys.readouterr().err == (f"error: the run gpt_s1337 would write names longer than the {limit} bytes its "
                                       f"file system allows; shorten --graphs (a run's name holds its graph, every "
                                       f"layer's in a per-layer list)\n")
    assert not (in_tmp_path / "runs" / "gpt_s1337").exists() and not (in_tmp_path / "report" / "out").exists()


def test_rel_positions_reach_graph_layers_as_edge_features_and_others_see_the_structure(capsys):
    assert main(PYG_GPT, ["--list_layers"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:-1]}
    for name in ("GATConv", "GATv2Conv", "TransformerConv", "GINEConv"):
        assert lines[name][1:3] == ["yes", "yes"]
    for name in ("GCNConv", "SAGEConv"):
        assert lines[name][1:3] == ["yes", "no"]
    from conftest import tiny_config
    from gnngpt.models import GPT

    model = GPT(tiny_config("TransformerConv", pos="rel"))
    assert model.blocks[0].mixer.conv.conv.lin_edge is not None
    assert torch.all(torch.isfinite(model(torch.randint(0, 17, (2, 6)))[0]))


def test_a_run_from_before_graphs_and_positions_is_reused_and_resumed(in_tmp_path, tiny_text_file, capsys):
    args = [*TINY, "--data", str(tiny_text_file), "--out_dir", "runs/gpt_s1337"]  # where compare.py keeps it
    assert main(GPT_SCRIPT, args) == 0
    run = in_tmp_path / "runs" / "gpt_s1337"
    config = json.loads((run / "config.json").read_text())
    checkpoint = torch.load(run / "ckpt.pt", weights_only=True)
    for settings in (config["settings"], config["model_config"], checkpoint["model_config"]):
        del settings["graph"], settings["pos"]  # as runs were written before these settings existed
    checkpoint["config"] = config
    (run / "config.json").write_text(json.dumps(config))
    torch.save(checkpoint, run / "ckpt.pt")
    capsys.readouterr()
    assert compare.main(["--data", str(tiny_text_file), *TINY, "--models", "gpt"]) == 0
    assert "gpt_s1337: reusing the finished run" in capsys.readouterr().out
    summary = run_summary(run)  # and reported as the model it is, on the complete graph
    assert (summary["graph"], summary["pos"], summary["edges_per_token"]) == ("full", "abs", (16 + 1) / 2)
    assert main(GPT_SCRIPT, [*args, "--resume", "--max_iters", "6"]) == 0
    assert load_checkpoint(run / "ckpt.pt")["step"] == 6
