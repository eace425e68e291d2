import pytest
import torch
from torch.nn import functional as F

from conftest import tiny_config, train_losses
from gnngpt.graph import FULL, causal_edge_index, parse_graph
from gnngpt.mixers import DENSE_LAYERS, GAT_LAYERS
from gnngpt.models import GPT, BigramConfig, BigramLanguageModel, Block

MODELS = ["bigram", "attention", *GAT_LAYERS]


def make_model(name, **overrides):
    if name == "bigram":
        return BigramLanguageModel(BigramConfig(vocab_size=17))
    return GPT(tiny_config(name, **overrides))


def assert_causal(model, T=12):
    """Changing token t changes no logits before t, and does change those at t."""
    idx = torch.randint(0, 17, (3, T))
    base, _ = model(idx)
    for t in (0, 5, T - 1):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 17
        logits, _ = model(changed)
        assert torch.equal(logits[:, :t], base[:, :t])
        assert not torch.allclose(logits[:, t:], base[:, t:])


@pytest.mark.parametrize("name", MODELS)
def test_changing_token_t_changes_no_earlier_logits(name):
    assert_causal(make_model(name).eval())


def assert_deaf_beyond_reach(model, T=12):
    """On graphs of bounded reach (each layer's largest i - j), the last token's logits do not change with a token
    further back than the layers' reaches summed, and do with one just within them."""
    reach = sum(graph.reach for graph in model.graphs)
    idx = torch.randint(0, 17, (3, T))
    base, _ = model(idx)
    for t, heard in ((T - 2 - reach, False), (T - 1 - reach, True)):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 17
        logits, _ = model(changed)
        assert torch.equal(logits[:, -1], base[:, -1]) != heard


@pytest.mark.parametrize("pos", ["abs", "rel"])
@pytest.mark.parametrize("graph", ["full", "window:3", "dilated:2:3", "strided:3:4", "sink:2:3", "window:1,full",
                                   "window:2,dilated:2:2"])
@pytest.mark.parametrize("name", ["attention", "GATConv", "GATv2Conv", "TransformerConv", "GCNConv"])
def test_every_model_is_causal_on_every_graph_with_either_positions(name, graph, pos, small_chunks):
    for backend in ("fast", "pyg") if name in DENSE_LAYERS else ("pyg",):
        model = make_model(name, graph=graph, pos=pos, backend=backend).eval()
        assert_causal(model)
        if None not in (g.reach for g in model.graphs):
            assert_deaf_beyond_reach(model)


@pytest.mark.parametrize("name", DENSE_LAYERS)
def test_with_relative_positions_each_edge_carries_its_distance_over_block_size(name):
    model = GPT(tiny_config(name, pos="rel", backend="pyg", block_size=8, graph="window:3,full"))
    seen = []
    for block in model.blocks:
        block.mixer.conv.register_forward_pre_hook(
            lambda conv, args, kwargs: seen.append((args[1], kwargs["edge_attr"])), with_kwargs=True)
    model(torch.randint(0, 17, (2, 5)))  # five tokens: the scale is the block's 8, not the input's length
    for (sources, targets), edge_attr in seen:
        assert torch.equal(edge_attr[:, 0], (targets - sources) / 8)
    assert [edge_attr.max().item() for _, edge_attr in seen] == [2 / 8, 4 / 8]


def lecture_attention(attn, x, p):
    """The lecture's multi-head attention with attn's weights: masked softmax of q k^T / sqrt(hs), then dropout of
    the weights (p), the values, the projection."""
    B, T, C = x.shape
    q, k, v = attn.heads(x)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    wei = (q @ k.transpose(-2, -1) * k.size(-1) ** -0.5).masked_fill(~causal, float("-inf")).softmax(dim=-1)
    wei = torch.nn.functional.dropout(wei, p=p, training=True)
    return attn.proj((wei @ v).transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("graph", ["full", "window:12"])  # scaled_dot_product_attention's causal path; a mask
def test_the_transformers_attention_dropout_spreads_its_output_as_the_lectures_does(graph):
    """The attention weights' dropout (p = 0.5) spreads the output as much as the lecture's (one that dropped at
    half the rate was measured at about half of it)."""
    block = Block(tiny_config("attention", dropout=0.5, graph=graph), parse_graph(graph, 1)[0]).train()
    attn = block.mixer
    attn.resid_dropout.p = 0.0  # the attention weights' dropout alone
    x = torch.randn(2, 12, 16)
    torch.manual_seed(0)
    with torch.no_grad():
        model = torch.stack([attn(x) for _ in range(100)]).var(dim=0).mean()
        lecture = torch.stack([lecture_attention(attn, x, 0.5) for _ in range(100)]).var(dim=0).mean()
    assert 0.85 < model / lecture < 1.15


@pytest.mark.parametrize("name", GAT_LAYERS)
def test_graph_block_equals_pyg_layer_on_each_sequence(name):
    block = Block(tiny_config(name), FULL).eval()
    x = torch.randn(4, 9, 16)
    batched = block.mixer(x)
    conv = block.mixer.conv
    for b in range(4):
        single = conv(x[b], causal_edge_index(1, 9))
        torch.testing.assert_close(batched[b], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_tiny_model_loss_goes_down(name):
    torch.manual_seed(0)
    model = make_model(name)
    lr = 1e-1 if name == "bigram" else 3e-3
    # a fixed periodic sequence: easy to learn, so the loss must fall clearly
    seq = torch.arange(13) % 7
    x, y = seq[:12].repeat(8, 1), seq[1:13].repeat(8, 1)
    losses = train_losses(model, [(x, y)] * 40, lr=lr)
    assert losses[-1] < 0.5 * losses[0]


def test_linear_and_embedding_weights_use_the_lecture_init():
    model = GPT(tiny_config("GATConv", n_embd=64, n_head=4, vocab_size=50))
    assert abs(model.token_embedding.weight.std().item() - 0.02) < 0.003
    assert torch.count_nonzero(model.lm_head.bias) == 0
    ffn = model.blocks[0].ffwd.net[0]
    assert abs(ffn.weight.std().item() - 0.02) < 0.003


@pytest.mark.parametrize("name", MODELS)
def test_last_only_gives_the_last_tokens_logits_of_the_full_pass(name):
    model = (make_model(name) if name == "bigram" else make_model(name, graph="window:3")).eval()
    idx = torch.randint(0, 17, (2, 12))
    full, _ = model(idx)
    last, _ = model(idx, last_only=True)
    assert last.shape == (2, 1, 17)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixer", ["attention", "GATConv", "TransformerConv", "GCNConv"])
def test_every_block_drops_out_after_its_mixer_and_its_feed_forward_in_training_alone(mixer):
    model = GPT(tiny_config(mixer, dropout=0.5))
    assert all(module.training for module in model.modules())  # a probe at build time leaves none in eval mode
    calls = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout):
            module.register_forward_hook(lambda m, args, out, name=name: calls.append((name, args[0], out)))
    x = torch.randint(0, 17, (2, 12))
    model(x)
    for i in range(2):
        for part in ("mixer", "ffwd"):
            assert any(name.startswith(f"blocks.{i}.{part}.") for name, _, _ in calls), (i, part, calls)
    for name, given, out in calls:  # each zeroes entries and doubles the others, as p=0.5 does
        kept = out != 0
        assert torch.allclose(out[kept], 2 * given[kept]) and 0.3 < kept.float().mean() < 0.7, name
    calls.clear()
    model.eval()(x)
    assert all(torch.equal(given, out) for _, given, out in calls)


@pytest.mark.parametrize("mixer", ["attention", "GATConv"])
def test_a_forward_pass_is_the_lectures_pre_norm_model_put_together_from_the_models_own_parts(mixer):
    model = GPT(tiny_config(mixer, dropout=0.5)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):  # not the identity they start as: each norm shows
                module.weight.normal_()
                module.bias.normal_()
    idx = torch.randint(0, 17, (3, 12))
    C = model.config.n_embd

    def norm(x, ln):
        return F.layer_norm(x, (C,), ln.weight, ln.bias)

    with torch.no_grad():
        x = model.token_embedding.weight[idx] + model.position_embedding.weight[:12]
        for block in model.blocks:
            x = x + block.mixer(norm(x, block.ln1))  # x + mixer(LayerNorm(x)), dropout off in eval mode
            first, second = block.ffwd.net[0], block.ffwd.net[2]
            assert first.weight.shape == (4 * C, C) and second.weight.shape == (C, 4 * C)  # FFN = C -> 4C -> C
            x = x + F.linear(F.relu(F.linear(norm(x, block.ln2), first.weight, first.bias)), second.weight,
                             second.bias)
        expected = F.linear(norm(x, model.ln_f), model.lm_head.weight, model.lm_head.bias)
        logits, _ = model(idx)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("graph", ["full", "window:3"])
@pytest.mark.parametrize("mixer", ["attention", "GATConv"])
def test_in_eval_mode_a_model_with_dropout_computes_what_it_would_without(mixer, graph):
    model = GPT(tiny_config(mixer, dropout=0.5, graph=graph)).eval()
    without = GPT(tiny_config(mixer, dropout=0.0, graph=graph)).eval()
    without.load_state_dict(model.state_dict())
    idx = torch.randint(0, 17, (3, 12))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], without(idx)[0])
