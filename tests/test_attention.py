import os
import shutil
import stat
import struct
import zlib
from pathlib import Path

import matplotlib.image
import pytest
import torch
from matplotlib.figure import Figure

import plot_attention
from conftest import randomize_distance_terms, tiny_config
from gnngpt import rundir
from gnngpt.attention import attention_maps, rank_agreement
from gnngpt.config import PRESETS
from gnngpt.data import DATA_SHA256
from gnngpt.errors import UsageError
from gnngpt.graph import parse_graph
from gnngpt.models import GPT, BigramConfig, BigramLanguageModel
from gnngpt.plots import ATTENTION_FIGURE, png_texts, save_figure

ATTENTION_MODELS = [("attention", "fast"), ("GATConv", "fast"), ("GATConv", "pyg"), ("GATv2Conv", "fast"),
                    ("GATv2Conv", "pyg"), ("TransformerConv", "fast"), ("TransformerConv", "pyg")]


def block_inputs(model, idx):
    """The LayerNorm'd input of each block's mixer, computed block by block (the reference walk)."""
    x = model.token_embedding(idx)
    if model.position_embedding is not None:  # relative positions enter in the mixers instead
        x = x + model.position_embedding(torch.arange(idx.size(1)))
    inputs = []
    for block in model.blocks:
        inputs.append(block.ln1(x))
        x = block(x)
    return inputs


def mixer_output_from_maps(mixer, maps, h):
    """The mixer's output rebuilt as attention maps (B, H, T, T) times each layer's values, from its own weights."""
    B, T, C = h.shape
    H = maps.size(1)
    if hasattr(mixer, "qkv"):
        v = mixer.qkv(h).split(C, dim=2)[2].view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, hs)
        return mixer.proj((maps @ v).transpose(1, 2).reshape(B, T, C))
    conv = mixer.conv
    if type(conv).__name__ == "TokenMixer":  # a TransformerConv: values, each with its distance's term, and the skip
        conv = conv.conv
        values = conv.lin_value(h).view(B, T, H, -1)
        out = torch.einsum("bhij,bjhc->bihc", maps, values)
        if conv.lin_edge is not None:
            distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]  # i - j (negative ones weigh 0)
            terms = conv.lin_edge(distance[..., None] / mixer.block_size).view(T, T, H, -1)
            out = out + torch.einsum("bhij,ijhc->bihc", maps, terms)
        return out.reshape(B, T, -1) + conv.lin_skip(h)
    lin = conv.lin if type(conv).__name__ == "GATConv" else conv.lin_l  # the messages: h_j or xl_j
    values = lin(h).view(B, T, H, -1)  # (B, T, H, C // H)
    return torch.einsum("bhij,bjhc->bihc", maps, values).reshape(B, T, -1) + conv.bias


GRAPHS = ["full", "window:3", "sink:2:3", "dilated:2:3", "window:2,strided:3:4"]


def graph_model(mixer, backend, graph, pos):
    """A tiny model on graph, with random distance biases where it has them."""
    model = GPT(tiny_config(mixer, backend=backend, graph=graph, pos=pos)).eval()
    randomize_distance_terms(model)
    return model


@pytest.mark.parametrize("pos", ["abs", "rel"])
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("mixer,backend", ATTENTION_MODELS)
def test_attention_rows_sum_to_one_over_each_querys_edges_only(mixer, backend, graph, pos):
    model = graph_model(mixer, backend, graph, pos)
    idx = torch.randint(0, 17, (3, 12))
    maps = attention_maps(model, idx)
    assert len(maps) == model.config.n_layer
    for block, layer_maps in zip(model.blocks, maps):
        assert layer_maps.shape == (3, 2, 12, 12)
        torch.testing.assert_close(layer_maps.sum(-1), torch.ones(3, 2, 12))
        edges = block.mixer.graph.mask(12)  # the graph's definition: j -> i where connects(i, j)
        assert torch.all(layer_maps[..., ~edges] == 0)  # no weight off the graph, later tokens included
        assert torch.all(layer_maps[..., edges] > 0)  # every edge carries some, the token's own included


@pytest.mark.parametrize("pos", ["abs", "rel"])
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("mixer,backend", ATTENTION_MODELS)
def test_maps_times_values_give_the_models_own_mixer_output(mixer, backend, graph, pos):
    model = graph_model(mixer, backend, graph, pos)
    idx = torch.randint(0, 17, (2, 12))
    maps = attention_maps(model, idx)
    with torch.no_grad():
        for block, layer_maps, h in zip(model.blocks, maps, block_inputs(model, idx)):
            expected = block.mixer(h)
            torch.testing.assert_close(mixer_output_from_maps(block.mixer, layer_maps, h), expected,
                                       rtol=1e-5, atol=1e-5)


def test_attention_maps_leave_training_mode_and_hooks_as_they_were():
    model = GPT(tiny_config("GATConv", dropout=0.5)).train()
    idx = torch.randint(0, 17, (1, 12))
    first = attention_maps(model, idx)
    assert model.training
    assert all(not b.mixer._forward_hooks for b in model.blocks)
    for a, b in zip(first, attention_maps(model, idx)):  # eval mode inside: no attention dropout
        torch.testing.assert_close(a, b)


def test_gatv1_attention_is_static_and_gatv2_and_dot_products_are_not():
    idx = torch.randint(0, 17, (1, 12))
    agreement = {name: torch.stack([rank_agreement(m[0]) for m in attention_maps(GPT(tiny_config(name)).eval(), idx)])
                 for name in ("GATConv", "GATv2Conv", "attention", "TransformerConv")}
    assert torch.all(agreement["GATConv"] == 1)  # every query ranks the keys it sees in one order
    assert agreement["GATv2Conv"].min() < 1
    assert agreement["attention"].min() < 1
    assert agreement["TransformerConv"].min() < 1


def test_rank_agreement_on_hand_made_maps():
    T = 5
    causal = torch.ones(T, T).tril().bool()
    scores = torch.tensor([0.3, 2.0, -1.0, 0.5, 1.0])
    static = torch.softmax(scores.expand(T, T).masked_fill(~causal, float("-inf")), dim=-1)
    assert rank_agreement(static[None]).item() == 1
    # the last query ranks the keys one way; every earlier query ranks them the opposite way
    reversed_rows = torch.softmax(torch.where(torch.arange(T)[:, None] == T - 1, scores, -scores)
                                  .masked_fill(~causal, float("-inf")), dim=-1)
    assert rank_agreement(reversed_rows[None]).item() == 0


def test_rank_agreement_counts_only_key_pairs_that_both_queries_see_on_their_graph():
    (window,) = parse_graph("window:3", 1)
    edges = window.mask(5)  # query 3 sees keys 1-3, the last query keys 2-4: they share the pair (2, 3)
    scores = torch.zeros(5, 5)
    scores[3, 1:4] = torch.tensor([3.0, 2.0, 1.0])  # query 3 ranks key 2 above key 3
    scores[4, 2:5] = torch.tensor([1.0, 2.0, 3.0])  # the last query ranks key 3 above key 2
    maps = torch.softmax(scores.masked_fill(~edges, float("-inf")), dim=-1)[None]
    assert rank_agreement(maps, edges).item() == 0
    assert rank_agreement(maps).item() > 0  # as if the graph were complete: pairs the last query never sees


def test_models_without_attention_or_too_long_prompts_are_refused():
    with pytest.raises(UsageError, match="a bigram model has no attention weights to draw"):
        attention_maps(BigramLanguageModel(BigramConfig(vocab_size=17)), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(UsageError, match="a GCNConv model has no attention weights"):
        attention_maps(GPT(tiny_config("GCNConv")), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(UsageError, match="the prompt has 13 characters, more than the model's context of 12"):
        attention_maps(GPT(tiny_config("GATConv")), torch.zeros(1, 13, dtype=torch.long))


@pytest.mark.parametrize("name", ["gpt", "GATConv", "GATv2Conv", "TransformerConv"])
def test_plot_renders_from_a_checkpoint_and_plots_rows_that_sum_to_one(name, tiny_run, tmp_path, monkeypatch,
                                                                       capsys):
    run = shutil.copytree(tiny_run(name), tmp_path / name)  # the figure goes beside the checkpoint
    monkeypatch.chdir(tmp_path)
    plotted = []
    real_plot = plot_attention.plot_attention
    monkeypatch.setattr(plot_attention, "plot_attention",
                        lambda maps, tokens, *args: plotted.append((maps, tokens)) or real_plot(maps, tokens, *args))
    capsys.readouterr()
    assert plot_attention.main(["--out_dir", str(run), "--prompt", "To be or\nnot"]) == 0
    png = run / "attention.png"
    assert f"wrote {png}\n" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    maps, tokens = plotted[0]
    assert tokens == list("To be or\nnot") and len(maps) == 2  # n_layer
    for layer_maps in maps:  # (H, T, T)
        torch.testing.assert_close(layer_maps.sum(-1), torch.ones(2, 12))
        assert torch.all(layer_maps.triu(diagonal=1) == 0)


@pytest.mark.parametrize("out,message", [
    ("plots", "error: --out plots is a directory; give --out a file name, such as plots/attention.png\n"),
    ("/proc/attention.png", "error: cannot write --out /proc/attention.png (No such file or directory); choose "
                            "another --out\n"),
    ("pipe", "error: --out pipe is not a regular file (a device or a pipe); give --out a file name\n"),
])
def test_an_out_that_cannot_be_written_is_one_line(out, message, tiny_run, tmp_path, monkeypatch, capsys):
    run = tiny_run("gpt")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plots").mkdir()
    os.mkfifo(tmp_path / "pipe")
    capsys.readouterr()
    assert plot_attention.main(["--out_dir", str(run), "--prompt", "To be", "--out", out]) == 2
    assert capsys.readouterr().err == message
    assert sorted(tmp_path.rglob("*")) == [tmp_path / "pipe", tmp_path / "plots"]
    assert stat.S_ISFIFO((tmp_path / "pipe").stat().st_mode)


def test_an_out_that_is_no_attention_figure_of_this_script_is_left_alone(tiny_run, tmp_path, monkeypatch, capsys):
    run = tiny_run("gpt")
    monkeypatch.chdir(tmp_path)
    shipped = Path(__file__).parents[1] / "plots" / "paper" / "val_loss.png"
    (tmp_path / "val_loss.png").write_bytes(shipped.read_bytes())
    (tmp_path / "notes.png").write_text("not a figure")
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)  # a header no image decoder would load
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr
                                         + struct.pack(">I", zlib.crc32(ihdr)))
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    for out, message in [("fig.pdf", "error: --out fig.pdf: the figure is a PNG; give a file name ending in .png\n"),
                         (str(run / "ckpt.pt"), f"error: --out {run / 'ckpt.pt'}: the figure is a PNG; give a file "
                                                f"name ending in .png\n"),
                         ("val_loss.png", "error: --out val_loss.png exists and is not an attention figure of "
                                          "plot_attention.py; choose another --out, or remove that file first\n"),
                         ("notes.png", "error: --out notes.png exists and is not an attention figure of "
                                       "plot_attention.py; "),
                         ("huge.png", "error: --out huge.png exists and is not an attention figure of ")]:
        assert plot_attention.main(["--out_dir", str(run), "--prompt", "To be", "--out", out]) == 2
        assert capsys.readouterr().err.startswith(message)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before

    for _ in range(2):  # its own figure it draws again
        assert plot_attention.main(["--out_dir", str(run), "--prompt", "To be", "--out", "attention.PNG"]) == 0
        assert png_texts(tmp_path / "attention.PNG")["Description"] == ATTENTION_FIGURE

    mine = shutil.copytree(run, tmp_path / "run")  # its default path is its own, marked or not (drawn before marks)
    (mine / "attention.png").symlink_to(tmp_path / "notes.png")  # unless it links elsewhere
    assert plot_attention.main(["--out_dir", str(mine), "--prompt", "To be"]) == 2
    assert capsys.readouterr().err == (f"error: {mine / 'attention.png'} exists and is not an attention figure of "
                                       f"plot_attention.py; choose another --out, or remove that file first\n")
    assert (tmp_path / "notes.png").read_text() == "not a figure"
    (mine / "attention.png").unlink()
    (mine / "attention.png").write_bytes(shipped.read_bytes())
    assert plot_attention.main(["--out_dir", str(mine), "--prompt", "To be"]) == 0
    assert png_texts(mine / "attention.png")["Description"] == ATTENTION_FIGURE


def test_a_shipped_figure_is_replaced_by_its_own_model_alone(tiny_run, tmp_path, monkeypatch, capsys):
    run = tiny_run("gpt")
    plots = Path(__file__).parents[1] / "plots"
    before = {p: p.read_bytes() for p in plots.glob("attention_*.png")}
    mine = shutil.copytree(run, tmp_path / "run")
    (mine / "attention.png").symlink_to(plots / "attention_GATConv.png")
    capsys.readouterr()
    for out in (["--out", str(plots / "attention_GATConv.png")], []):  # named, or through the default path's link
        assert plot_attention.main(["--out_dir", str(mine), "--prompt", "To be", *out]) == 2
        shown = plots / "attention_GATConv.png" if out else mine / "attention.png"
        assert capsys.readouterr().err == (f"error: {shown} is a figure in the repository's plots/, where it keeps "
                                           f"the figures it ships, and a gpt model draws only "
                                           f"plots/attention_gpt.png there; choose another --out\n")
    assert {p: p.read_bytes() for p in plots.glob("attention_*.png")} == before
    in_plots = shutil.copytree(run, tmp_path / "plots" / "runs" / "gpt")  # a run kept in a folder of plots/
    monkeypatch.setattr(rundir, "SHIPPED_REPORTS", tmp_path / "plots")  # as if this were the repository's
    for _ in range(2):  # its default attention.png is its own there too
        assert plot_attention.main(["--out_dir", str(in_plots), "--prompt", "To be"]) == 0

    shipped = tmp_path / "plots" / "attention_gpt.png"
    shipped.write_bytes((plots / "attention_gpt.png").read_bytes())
    capsys.readouterr()
    assert plot_attention.main(["--out_dir", str(mine), "--prompt", "To be", "--out", str(shipped)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {shipped} is the figure the repository ships, and it was drawn from another run "
                          f"or prompt (") and err.endswith("); draw it from that run and prompt (docs/sampling.md), "
                                                           "or choose another --out\n")
    for difference in ("n_embd was 128, now 16", "block_size was 64, now 16", "step was 2000, now 2",
                       "prompt was 'ROMEO:\\nBut soft! what light', now 'To be'"):
        assert difference in err
    assert err.count("\n") == 1 and shipped.read_bytes() == (plots / "attention_gpt.png").read_bytes()

    assert plot_attention.main(["--out_dir", str(mine), "--prompt", "To be", "--out", str(tmp_path / "own.png")]) == 0
    save_figure(Figure(), tmp_path / "unrecorded.png", {"Description": ATTENTION_FIGURE})  # marked, recording no run
    for figure, message in [(tmp_path / "unrecorded.png", "(the figure records no run)"),
                            (tmp_path / "own.png", None)]:  # drawn from this run and prompt: drawn again
        shipped.write_bytes(figure.read_bytes())
        before = shipped.stat().st_ino
        assert plot_attention.main(["--out_dir", str(mine), "--prompt", "To be", "--out", str(shipped)]) == (
            2 if message else 0)
        assert (shipped.stat().st_ino == before) == bool(message)  # replaced (a new file) or left alone
        assert message is None or message in capsys.readouterr().err
    capsys.readouterr()
    assert plot_attention.main(["--out_dir", str(mine), "--prompt", "be or", "--out", str(shipped)]) == 2
    assert "(prompt was 'To be', now 'be or')" in capsys.readouterr().err


def test_each_shipped_figure_records_the_documented_run_and_prompt():
    """The figures in plots/ were drawn from the cpu preset's runs of their models, seed 1337, at the last step, with
    the default prompt (docs/sampling.md gives the commands)."""
    plots = Path(__file__).parents[1] / "plots"
    for name in ("gpt", "GATConv", "GATv2Conv", "TransformerConv"):
        source = plot_attention.recorded_source(plots / f"attention_{name}.png")
        assert source is not None, name
        assert (source["name"], source["seed"], source["prompt"]) == (name, 1337, plot_attention.DEFAULT_PROMPT)
        assert source["data_sha256"] == DATA_SHA256  # tinyshakespeare
        settings = source["settings"]
        assert all(settings[key] == value for key, value in PRESETS["cpu"]["gpt"].items()), name
        assert source["step"] == settings["max_iters"] and settings["graph"] == "full" and settings["pos"] == "abs"
        assert source["model_config"]["mixer"] == {"gpt": "attention"}.get(name, name)


@pytest.mark.parametrize("name,prompt,message", [
    ("bigram", "To be", "error: a bigram model has no attention weights to draw; use a run of gpt.py or of "
                        "pyg-gpt.py with GATConv, GATv2Conv or TransformerConv\n"),
    ("gpt", "To be!", "error: the prompt has characters outside the model's vocabulary: '!'"),
])
def test_plot_attention_errors_are_one_line(name, prompt, message, tiny_run, tmp_path, monkeypatch, capsys):
    run = tiny_run(name)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert plot_attention.main(["--out_dir", str(run), "--prompt", prompt]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message)
    assert not (tmp_path / "plots").exists()
