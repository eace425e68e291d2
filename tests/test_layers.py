import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import tiny_config, train_losses
from gnngpt.checkpoint import load_checkpoint
from gnngpt.cli import main, pyg_version
from gnngpt.config import PYG_GPT
from gnngpt.errors import UsageError
from gnngpt.graph import causal_edge_index
from gnngpt.guard import SUPPORT_SIZES, check_layer, future_leak, layer_support, one_thread, refusal_reason, run_seeded
from gnngpt.mixers import GAT_LAYERS, build_conv, causal_degree_histogram, conv_layer_names, pyg_nn, run_conv
from gnngpt.models import GPT, model_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LAYERS = conv_layer_names()  # from the installed PyG, so a new version's layers are covered too
TINY = ["--max_iters", "4", "--eval_interval", "2", "--eval_iters", "1", "--batch_size", "2", "--block_size", "8",
        "--n_embd", "16", "--n_head", "2", "--n_layer", "1", "--device", "cpu", "--learning_rate", "1e-2"]


def support_config(name, **kwargs):
    """A one-block model of the sizes that layer_support() probes."""
    return tiny_config(name, n_layer=1, mixer_kwargs=kwargs, **SUPPORT_SIZES)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # tiny tensors: more threads only wait for each other
        yield


@pytest.fixture(scope="module")
def support():
    return {r.name: r for r in layer_support()}


def earlier_logits_change(model, T):
    """Whether changing the last token changes the logits of earlier tokens (training mode, same dropout masks)."""
    idx = torch.randint(0, 17, (2, T))
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 17
    return not torch.equal(run_seeded(model, idx)[0][:, :-1], run_seeded(model, changed)[0][:, :-1])


def prefixes_change(model, T):
    """Whether the logits of the first t tokens alone differ from theirs in a sequence of T tokens, for some t,
    beyond float rounding (eval mode)."""
    idx = torch.randint(0, 17, (2, T))
    whole = run_seeded(model.eval(), idx)[0]
    return any(not torch.allclose(run_seeded(model, idx[:, :t])[0], whole[:, :t], rtol=1e-4, atol=1e-5)
               for t in range(1, T))


@pytest.mark.parametrize("name", LAYERS)
def test_every_pyg_layer_trains_causally_or_is_refused_with_a_reason(name):
    cfg = support_config(name)
    T = cfg.block_size
    reason = refusal_reason(cfg)
    if reason:
        assert reason.strip() and "\n" not in reason
        with pytest.raises(UsageError, match=f"^{name} cannot replace attention: ") as e:
            check_layer(cfg)
        assert "\n" not in str(e.value) and reason in str(e.value)
        if reason.startswith("sees the future"):  # the probe's verdict holds for the whole model too
            assert earlier_logits_change(GPT(cfg).train(), T)
        if reason.startswith("depends on how many tokens follow"):
            assert prefixes_change(GPT(cfg), T)
        return
    model = GPT(cfg)
    assert not prefixes_change(model, T)
    model.train()
    assert not earlier_logits_change(model, T)
    seq = torch.arange(T + 1) % 5  # a periodic sequence: the next token follows from the current one
    x, y = seq[:T].repeat(2, 1), seq[1:].repeat(2, 1)
    losses = train_losses(model, [(x, y)] * 15, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0]


def test_at_least_35_layers_work_including_those_with_recipes(support):
    working = {name for name, r in support.items() if r.works}
    assert len(working) >= 35
    with_recipes = {"APPNP", "SSGConv", "GCN2Conv", "PNAConv", "GINConv", "GINEConv", "EdgeConv",
                    "NNConv", "FiLMConv", "MixHopConv", "GENConv", "GMMConv", "DNAConv", "PDNConv"}
    assert {*GAT_LAYERS, *with_recipes} <= working


@pytest.mark.parametrize("name,reason", [
    ("HeteroConv", "heterogeneous"), ("HGTConv", "heterogeneous"), ("RGCNConv", "relational"),
    ("PointNetConv", "point-cloud"), ("DenseGATConv", "dense layer"), ("DirGNNConv", "sees the future"),
    ("GPSConv", "sees the future"), ("HypergraphConv", "sees the future"),
])
def test_layers_that_cannot_serve_are_refused_with_their_reason(name, reason, support):
    assert not support[name].works and support[name].reason.startswith(reason)


@pytest.mark.parametrize("name", ["GATConv", "GCNConv", "SAGEConv", "TransformerConv"])
def test_guard_refuses_reversed_flow(name):
    cfg = support_config(name, flow="target_to_source")
    with pytest.raises(UsageError, match=f"^{name} cannot replace attention: sees the future.*change --gnn_kwargs"):
        check_layer(cfg)


def test_guard_refuses_batch_statistics_over_all_tokens():
    with pytest.raises(UsageError, match="sees the future: .*training mode"):
        check_layer(support_config("GENConv", norm="batch"))


class EveryTokenMixer(nn.Module):
    """Adds the mean of all tokens to each: attends globally."""

    def forward(self, x, edge_index):
        return x + x.mean(0)


class NextTokenPeek(nn.Module):
    """Adds the next token of the same sequence, only when that token is not the last of its sequence."""

    def forward(self, x, edge_index):
        peek = torch.zeros_like(x).view(2, -1, x.size(-1))
        peek[:, :-2] = x.view(2, -1, x.size(-1))[:, 1:-1]
        return x + peek.view_as(x)


class NeighbourMean(nn.Module):
    """Each token receives the mean of its incoming messages; by_out_degree divides each message by its sender's
    out-degree, as a symmetric Laplacian does: later tokens then change no value of an earlier one, but their
    number does."""

    def __init__(self, by_out_degree):
        super().__init__()
        self.by_out_degree = by_out_degree

    def forward(self, x, edge_index):
        source, target = edge_index
        messages = x[source]
        if self.by_out_degree:
            messages = messages / torch.bincount(source, minlength=x.size(0)).to(x.dtype)[source, None]
        summed = torch.zeros_like(x).index_add_(0, target, messages)
        return summed / torch.bincount(target, minlength=x.size(0)).to(x.dtype)[:, None]


def test_probe_catches_global_mixing_and_a_leak_that_skips_the_last_token():
    assert future_leak(EveryTokenMixer(), 8).startswith("sees the future: changing token 7")
    assert future_leak(NextTokenPeek(), 8).startswith("sees the future: changing token 6")


class FaintEarlyLeak(nn.Module):
    """Adds a ten-thousandth of token 2 to token 1, in the second sequence of the batch only."""

    def forward(self, x, edge_index):
        out = x.clone().view(2, -1, x.size(-1))
        out[1, 1] += 1e-4 * out[1, 2]
        return out.view_as(x)


class ThreeTokensApart(nn.Module):
    """Doubles its input in sequences of exactly three tokens: a prefix of three alone differs, no other does."""

    def forward(self, x, edge_index):
        return x * 2 if x.size(0) == 2 * 3 else x


def test_probe_catches_a_faint_leak_from_an_early_token_in_one_sequence_of_the_batch():
    assert future_leak(FaintEarlyLeak(), 8) == ("sees the future: changing token 2 changed the outputs of earlier "
                                               "tokens (training mode)")


def test_probe_compares_every_prefix_with_the_whole_sequence():
    assert future_leak(ThreeTokensApart(), 8) == (
        "depends on how many tokens follow: the outputs of the first 3 tokens alone differ from theirs in a sequence "
        "of 8 (eval mode)")


def test_probe_catches_a_normalisation_by_out_degree():
    assert future_leak(NeighbourMean(by_out_degree=True), 8) == (
        "depends on how many tokens follow: the outputs of the first 7 tokens alone differ from theirs in a sequence "
        "of 8 (eval mode)")
    assert future_leak(NeighbourMean(by_out_degree=False), 8) == ""


@pytest.mark.parametrize("normalization", [None, "sym", "rw"])
def test_chebconv_is_refused_in_every_normalisation_pyg_offers(normalization):
    """PyG's Laplacians weigh each token by its out-degree, which counts the tokens after it."""
    reason = refusal_reason(support_config("ChebConv", normalization=normalization))
    assert reason.startswith("depends on how many tokens follow: the outputs of the first 7 tokens alone differ")


class FirstChannels(nn.Module):
    """Keeps the first four channels: causal, but too narrow."""

    def forward(self, x, edge_index):
        return x[:, :4]


def test_probe_passes_causal_layers_and_checks_the_output_shape():
    assert future_leak(build_conv(support_config("GCNConv")), 16) == ""
    assert future_leak(FirstChannels(), 8) == "returns shape (16, 4) for 16 tokens of width 8"


def test_guard_leaves_the_random_state_alone():
    state = torch.get_rng_state()
    check_layer(support_config("GATConv"))
    assert torch.equal(torch.get_rng_state(), state)


def test_gat_layers_stay_raw_pyg_layers_and_others_get_the_adapter():
    conv = build_conv(support_config("GATv2Conv"))
    assert type(conv) is pyg_nn().GATv2Conv and conv.heads == 2 and conv.out_channels == 8
    mixhop = build_conv(support_config("MixHopConv"))  # three powers of the adjacency: 3 * n_embd wide
    assert mixhop.proj.in_features == 48 and mixhop.proj.out_features == 16
    assert build_conv(support_config("GCNConv")).proj is None
    transformer = build_conv(support_config("TransformerConv"))
    assert transformer.conv.heads == 2 and transformer.conv.out_channels == 8


def test_gnn_kwargs_override_the_gat_defaults():
    conv = build_conv(support_config("GATConv", dropout=0.3, heads=1, negative_slope=0.1))
    assert (conv.dropout, conv.heads, conv.negative_slope) == (0.3, 1, 0.1)


def test_adapter_feeds_x0_and_edge_features():
    x, edge_index = torch.randn(6, 16), causal_edge_index(2, 3)
    gcn2 = build_conv(support_config("GCN2Conv")).eval()
    torch.testing.assert_close(gcn2(x, edge_index), gcn2.conv(x, x, edge_index))
    gine = build_conv(support_config("GINEConv")).eval()
    distance = torch.tensor([0, 1, 0, 2, 1, 0] * 2, dtype=torch.float)[:, None] / 8  # (i - j) / block_size
    torch.testing.assert_close(run_conv(gine, x, edge_index, block_size=8), gine.conv(x, edge_index, distance))


def test_pna_gets_the_in_degree_histogram_of_the_causal_graph():
    assert causal_degree_histogram(4).tolist() == [0, 1, 1, 1, 1]  # token t has in-degree t + 1
    cfg = support_config("PNAConv")
    scaler = build_conv(cfg).conv.aggr_module  # PNA scales by the average degree it was given, linear and log
    degrees = range(1, cfg.block_size + 1)
    assert scaler.init_avg_deg_lin == pytest.approx(statistics.fmean(degrees))
    assert scaler.init_avg_deg_log == pytest.approx(statistics.fmean(math.log(d + 1) for d in degrees))


def test_gnn_flag_and_kwargs_train_end_to_end(tiny_text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--gnn", "TAGConv", "--gnn_kwargs", '{"K": 2}', "--data", str(tiny_text_file), "--out_dir", "out", *TINY]
    assert main(PYG_GPT, argv) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["name"] == "TAGConv"
    assert config["model_config"]["mixer"] == "TAGConv" and config["model_config"]["mixer_kwargs"] == {"K": 2}
    model = model_from_checkpoint(load_checkpoint(tmp_path / "out" / "ckpt.pt"))
    assert model.blocks[0].mixer.conv.conv.K == 2 and len(model.blocks[0].mixer.conv.conv.lins) == 3  # hops 0, 1, 2


BAD_LAYER_INPUTS = [
    (["--gnn", "GCNConv", "--gnn_kwargs", '{"flow": "target_to_source"}'],
     "GCNConv cannot replace attention: sees the future"),
    (["--gat_version", "GPSConv"], "GPSConv cannot replace attention: sees the future"),
    (["--gnn", "HANConv"], "HANConv cannot replace attention: heterogeneous"),
    (["--gnn", "GCNconv"], "unknown --gat_version 'GCNconv'; did you mean GCNConv?"),
    (["--gnn", "TAGConv", "--gnn_kwargs", '{"bogus": 1}'], "TAGConv cannot replace attention: cannot be built"),
    (["--gnn", "ChebConv"], "ChebConv cannot replace attention: depends on how many tokens follow"),
    (["--gnn", "GCNConv", "--gnn_kwargs", '{"cached": true}'], "cached=True reuses the graph of the first batch"),
    (["--gnn_kwargs", "{K: 2}"], "--gnn_kwargs is not valid JSON"),
    (["--gnn_kwargs", "[2]"], "--gnn_kwargs must be a JSON object, got [2]"),
    (["--gnn_kwargs", "[" * 100_000], "--gnn_kwargs nests too deeply to be read"),
]


@pytest.mark.parametrize("args,message", BAD_LAYER_INPUTS, ids=[m for _, m in BAD_LAYER_INPUTS])
def test_bad_layer_gives_one_line_error_and_writes_nothing(args, message, tiny_text_file, tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    assert main(PYG_GPT, ["--data", str(tiny_text_file), *TINY, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert set(tmp_path.iterdir()) == before


def test_list_layers_prints_what_the_probe_found(support, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(PYG_GPT, ["--list_layers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["layer", "works", "distances", "reason"]
    rows = {line.split()[0]: line.split(maxsplit=3)[1:] for line in lines[1:-1]}
    assert list(rows) == LAYERS
    for name, (works, distances, *reason) in rows.items():
        assert works == ("yes" if support[name].works else "no")
        assert distances == ("yes" if support[name].distances else "no")
        assert " ".join(reason) == support[name].reason
    n_working = sum(r.works for r in support.values())
    assert lines[-1] == (f"{n_working} of {len(LAYERS)} convolution classes work as the token mixer; with "
                         f"--pos rel, those marked 'distances' read each edge's distance i - j, the others see only "
                         f"the graph")
    assert list(tmp_path.iterdir()) == []


def load_layer_table_script():
    spec = importlib.util.spec_from_file_location("layer_table", ROOT / "scripts" / "layer_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_table_is_the_generated_one(support):
    script = load_layer_table_script()
    doc = (ROOT / "docs" / "layers.md").read_text(encoding="utf-8")
    if f"of torch_geometric {pyg_version()} work" not in doc:
        pytest.skip("the docs table was generated with another PyG version")
    table = script.layer_table(list(support.values()))
    assert table in doc
    assert script.replace_table(doc, table) == doc


def test_layer_table_script_rewrites_only_its_block(support, tmp_path):
    script = load_layer_table_script()
    readme = f"# Title\n\n{script.BEGIN}\nold table\n{script.END}\n\nmore text\n"
    table = script.layer_table(list(support.values()))
    assert script.replace_table(readme, table) == f"# Title\n\n{table}\n\nmore text\n"
    marked_loosely = f"\ufeff{script.BEGIN} \nold table\n{script.END}\t"  # a byte-order mark, trailing blanks
    assert script.replace_table(marked_loosely, table) == table
    n_refused = sum(not r.works for r in support.values())
    n_distances = sum(r.works and r.distances for r in support.values())
    assert table.count("\n| `") == n_refused
    assert table.count("`, `") == (len(LAYERS) - n_refused - 1) + (n_distances - 1)  # the two lists of names


@pytest.mark.parametrize("content,message", [
    (None, "cannot read {path} (No such file or directory); name the Markdown file that holds the layer table"),
    (b"\xff\xfe", "{path} is not UTF-8 text (byte 0); name the Markdown file that holds the layer table"),
    (b"# Layers\n", "{path} has no block from '<!-- layer table: generated by scripts/layer_table.py, do not edit by "
                    "hand -->' to '<!-- end of layer table -->'; add those two lines where the table goes"),
    ((ROOT / "scripts" / "layer_table.py").read_bytes(),  # the markers in lines of code, not lines of their own
     "{path} has no block from '<!-- layer table: generated by scripts/layer_table.py, do not edit by hand -->' to "
     "'<!-- end of layer table -->'; add those two lines where the table goes"),
], ids=["missing", "not UTF-8", "no markers", "markers in code"])
def test_layer_table_script_refuses_a_file_to_write_before_probing_the_layers(content, message, tmp_path,
                                                                            monkeypatch, capsys):
    script = load_layer_table_script()
    monkeypatch.setattr(script, "layer_support", lambda: pytest.fail("probed the layers before checking --write"))
    path = tmp_path / "layers.md"
    if content is not None:
        path.write_bytes(content)
    assert script.main(["--write", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {message.format(path=path)}\n"
    assert sorted(tmp_path.iterdir()) == ([path] if content is not None else [])
    assert content is None or path.read_bytes() == content
