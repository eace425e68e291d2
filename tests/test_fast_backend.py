"""The fast backend computes the PyG layers' function, and the cached decoder the full model's logits.

These tests run on --device: python -m pytest --device cuda tests/test_fast_backend.py checks them on a GPU.
"""
import logging

import pytest
import torch

import gnngpt.fast_gat as fast_gat
from conftest import (
    CAPTURE_ERROR,
    REPLAY_ERROR,
    assert_cached_decoding_equals_full,
    capture_that_raises,
    capture_whose_replay_raises,
    cuda_graph_warning,
    defined_edges,
    randomize_distance_terms,
    tiny_config,
    train_losses,
)
from gnngpt.cli import backend_description
from gnngpt.decoder import CUDA_GRAPHS, CachedDecoder, KVCache
from gnngpt.fallback import NO_FALLBACK
from gnngpt.graph import FULL, causal_edge_index
from gnngpt.layout import layout_for
from gnngpt.mixers import DENSE_LAYERS, TokenMixer, pyg_nn, run_conv
from gnngpt.models import GPT
from gnngpt.sampling import generate

LAYER_VARIANTS = [
    ("GATConv", {}),
    ("GATConv", {"concat": False, "negative_slope": 0.1}),
    ("GATConv", {"residual": True, "bias": False}),
    ("GATv2Conv", {}),
    ("GATv2Conv", {"share_weights": True, "concat": False}),
    ("GATv2Conv", {"residual": True, "negative_slope": 0.3}),
    ("GATConv", {"edge_dim": 1, "fill_value": 0.0}),  # each edge's distance as its feature
    ("GATv2Conv", {"edge_dim": 1, "add_self_loops": False}),
]
SHAPES = [(1, 1, 8, 1), (3, 7, 16, 2), (2, 12, 24, 4)]  # (B, T, n_embd, n_head)


@pytest.fixture(autouse=True)
def _on_device(device):
    """Every module and tensor a test here makes without naming a device is made on --device."""
    with torch.device(device):
        yield


def model_pair(mixer, kwargs, n_embd=16, n_head=2, **overrides):
    """The same weights under the fast and the pyg backend (randomised so that no term is trivially zero)."""
    cfg = dict(n_embd=n_embd, n_head=n_head, mixer_kwargs=kwargs, **overrides)
    fast = GPT(tiny_config(mixer, backend="fast", **cfg))
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(0.3 * torch.randn_like(p))
    pyg = GPT(tiny_config(mixer, backend="pyg", **cfg))
    pyg.load_state_dict(fast.state_dict())
    assert all(b.mixer.dense for b in fast.blocks) and not any(b.mixer.dense for b in pyg.blocks)
    return fast, pyg


def assert_close_relative(actual, expected, rel=1e-5):
    """Equal up to rel times the largest magnitude in expected (fp32 sums differ in order between backends)."""
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * expected.abs().max().item())


def assert_same_gradients(actual, expected, names, rel=1e-5):
    """Each gradient in actual equals its twin in expected up to rel times the largest entry of them all.

    The scale is the gradients' together, not each tensor's: GATConv's att_dst gradient sums softmax gradients
    that cancel exactly within each query's row, so it can be zero in exact arithmetic and fp32 rounding noise
    in either backend (each was measured about 1e-5 of its own largest entry away from a float64 PyG).
    """
    scale = max(g.abs().max().item() for g in expected)
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a, e, rtol=rel, atol=rel * scale, msg=lambda m, name=name: f"{name}: {m}")


def assert_same_outputs_and_grads(fast, pyg, idx, targets):
    out_fast, loss_fast = fast(idx, targets)
    out_pyg, loss_pyg = pyg(idx, targets)
    assert_close_relative(out_fast, out_pyg)
    loss_fast.backward()
    loss_pyg.backward()
    assert_same_parameter_gradients(fast, pyg)


def assert_same_parameter_gradients(fast, pyg, rel=1e-5):
    """assert_same_gradients over the models' parameters; one that neither uses (TransformerConv's lin_skip
    without root_weight) has no gradient in either."""
    named = [(name, a.grad, b.grad) for (name, a), b in zip(fast.named_parameters(), pyg.parameters())]
    assert [name for name, a, b in named if a is None] == [name for name, a, b in named if b is None]
    names, grads_fast, grads_pyg = zip(*((name, a, b) for name, a, b in named if a is not None))
    assert_same_gradients(grads_fast, grads_pyg, names, rel)


@pytest.mark.parametrize("mixer,kwargs", LAYER_VARIANTS)
@pytest.mark.parametrize("B,T,n_embd,n_head", SHAPES)
def test_dense_layer_equals_pyg_layer_in_outputs_and_gradients(mixer, kwargs, B, T, n_embd, n_head):
    conv = getattr(pyg_nn(), mixer)(n_embd, n_embd // n_head, heads=n_head, **kwargs)
    with torch.no_grad():
        for p in conv.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(B, T, n_embd, requires_grad=True)
    dense = fast_gat.dense_gat(conv, x, layout_for(FULL, T, x.device), block_size=T)
    ref = run_conv(conv, x.reshape(B * T, n_embd), causal_edge_index(B, T, x.device), block_size=T).view(B, T, -1)
    assert_close_relative(dense, ref)
    weights = torch.randn_like(ref)  # a random linear loss, so that every gradient entry matters
    grads_dense = torch.autograd.grad((dense * weights).sum(), [x, *conv.parameters()])
    grads_ref = torch.autograd.grad((ref * weights).sum(), [x, *conv.parameters()])
    assert_same_gradients(grads_dense, grads_ref, ["x", *(name for name, _ in conv.named_parameters())])


@pytest.mark.parametrize("mixer", DENSE_LAYERS)
@pytest.mark.parametrize("B,T,n_embd,n_head", SHAPES)
def test_fast_model_equals_pyg_model_in_outputs_and_gradients(mixer, B, T, n_embd, n_head):
    fast, pyg = model_pair(mixer, {}, n_embd, n_head)
    idx, targets = torch.randint(0, 17, (2, B, T))
    assert_same_outputs_and_grads(fast, pyg, idx, targets)


GRAPHS = ["full", "window:3", "dilated:2:3", "strided:3:4", "sink:2:3", "window:1,full"]  # the last: per layer


@pytest.fixture(params=["banded", "dense"])
def arrangement(request):
    """Both arrangements of window-like graphs at test sizes: banded (chunks of 4 queries) and dense (all keys)."""
    if request.param == "banded":
        request.getfixturevalue("small_chunks")  # which clears the cached layouts after the test
    return request.param


@pytest.mark.parametrize("pos", ["abs", "rel"])
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("mixer", DENSE_LAYERS)
def test_fast_model_equals_pyg_model_on_every_graph(mixer, graph, pos, arrangement):
    fast, pyg = model_pair(mixer, {}, graph=graph, pos=pos, block_size=16)
    if pos == "rel":
        assert fast.position_embedding is None and all(pyg_layer(b).lin_edge is not None for b in fast.blocks)
    idx, targets = torch.randint(0, 17, (2, 2, 14))
    assert_same_outputs_and_grads(fast, pyg, idx, targets)


def pyg_layer(block):
    """The PyG layer of a graph block: the mixer's conv, or the layer a TokenMixer wraps."""
    conv = block.mixer.conv
    return conv.conv if isinstance(conv, TokenMixer) else conv


TRANSFORMER_VARIANTS = [{}, {"concat": False}, {"beta": True}, {"beta": True, "concat": False},
                        {"root_weight": False}, {"bias": False}]


@pytest.mark.parametrize("pos", ["abs", "rel"])
@pytest.mark.parametrize("n_head", [1, 4])
@pytest.mark.parametrize("kwargs", TRANSFORMER_VARIANTS)
def test_fast_transformer_conv_equals_pyg_in_every_configuration(kwargs, n_head, pos):
    fast, pyg = model_pair("TransformerConv", kwargs, n_head=n_head, pos=pos, graph="window:1,full", block_size=12)
    conv = pyg_layer(fast.blocks[0])
    assert (conv.concat, conv.beta, conv.root_weight, conv.lin_skip.bias is not None) == \
        (kwargs.get("concat", True), kwargs.get("beta", False), kwargs.get("root_weight", True),
         kwargs.get("bias", True))
    idx, targets = torch.randint(0, 17, (2, 3, 11))
    assert_same_outputs_and_grads(fast, pyg, idx, targets)


@pytest.mark.parametrize("n_head", [1, 4])
@pytest.mark.parametrize("graph", GRAPHS)
def test_fast_transformer_conv_with_every_option_changed_equals_pyg_on_every_graph(graph, n_head, arrangement):
    kwargs = {"beta": True, "concat": False, "bias": False}
    fast, pyg = model_pair("TransformerConv", kwargs, n_head=n_head, pos="rel", graph=graph, block_size=16)
    idx, targets = torch.randint(0, 17, (2, 2, 14))
    assert_same_outputs_and_grads(fast, pyg, idx, targets)


@pytest.mark.parametrize("graph", ["full", "window:3", "sink:2:3"])
@pytest.mark.parametrize("mixer", DENSE_LAYERS)
def test_the_fast_backend_with_relative_positions_equals_pyg_on_inputs_longer_than_block_size(mixer, graph,
                                                                                             arrangement):
    fast, pyg = model_pair(mixer, {}, pos="rel", graph=graph, block_size=6)
    idx, targets = torch.randint(0, 17, (2, 2, 14))  # distances up to 13, past the block's 5
    assert_same_outputs_and_grads(fast, pyg, idx, targets)


@pytest.mark.parametrize("pos", ["abs", "rel"])
@pytest.mark.parametrize("mixer, kwargs, fused", [
    ("TransformerConv", {"beta": True}, False),
    ("GATConv", {}, False),
    ("GATv2Conv", {"negative_slope": 0.3}, False),  # the chunked kernel
    ("GATv2Conv", {"negative_slope": 0.3}, True),  # the fused kernels' arithmetic, uncompiled
])
def test_the_fast_backend_equals_pyg_in_float64(mixer, kwargs, fused, pos, monkeypatch):
    if fused:
        eager_fused_kernels(monkeypatch)
    fast, pyg = model_pair(mixer, kwargs, n_head=2, pos=pos, graph="sink:2:3", block_size=12)
    fast, pyg = fast.double(), pyg.double()
    idx, targets = torch.randint(0, 17, (2, 3, 12))
    out_fast, loss_fast = fast(idx, targets)
    out_pyg, loss_pyg = pyg(idx, targets)
    assert_close_relative(out_fast, out_pyg, rel=1e-12)
    loss_fast.backward()
    loss_pyg.backward()
    assert_same_parameter_gradients(fast, pyg, rel=1e-12)
    assert fast_gat.FUSED_GATV2.on or not fused  # the fused kernels computed it, not the chunked one after a failure


@pytest.mark.parametrize("kwargs,reason", [
    ({"aggr": "mean"}, "with aggr='mean' (the dense form sums, as aggr='add')"),
    ({"aggr": "max"}, "with aggr='max' (the dense form sums, as aggr='add')"),
    ({"flow": "target_to_source"}, "with flow='target_to_source' (the dense form passes messages from source to "
                                   "target)"),
])
@pytest.mark.parametrize("mixer", DENSE_LAYERS)
def test_a_message_passing_the_dense_form_does_not_cover_runs_on_pyg_and_says_so(mixer, kwargs, reason):
    reason = f"{mixer} {reason}"
    model = GPT(tiny_config(mixer, mixer_kwargs=kwargs))
    token_mixer = model.blocks[0].mixer
    assert not token_mixer.dense and not model.supports_cache and token_mixer.dense_refusal == reason
    assert backend_description(token_mixer) == f"pyg (message passing: the fast backend does not cover {reason})"
    assert backend_description(GPT(tiny_config("GCNConv")).blocks[0].mixer) == "pyg (message passing)"
    assert backend_description(GPT(tiny_config(mixer)).blocks[0].mixer) == "fast (masked dense attention)"


@pytest.mark.parametrize("mixer", DENSE_LAYERS)
def test_messages_summed_by_aggr_sum_run_on_the_fast_backend_as_pyg_computes_them(mixer):
    fast, pyg = model_pair(mixer, {"aggr": "sum"})
    assert fast.blocks[0].mixer.dense
    idx, targets = torch.randint(0, 17, (2, 2, 12))
    assert_same_outputs_and_grads(fast, pyg, idx, targets)


def boolean_mask_attention(attn, x, spec_mask):
    """The transformer mixer's output computed the plain way: scores, masked_fill by a boolean mask, softmax."""
    B, T, C = x.shape
    q, k, v = attn.heads(x)  # (B, H, T, hs)
    scores = q @ k.transpose(-2, -1) / (C // attn.n_head) ** 0.5
    if attn.distance_bias is not None:
        distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        scores = scores + attn.distance_bias[:, distance.clamp(min=0)]
    y = torch.softmax(scores.masked_fill(~spec_mask, float("-inf")), dim=-1) @ v
    return attn.proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("pos", ["abs", "rel"])
@pytest.mark.parametrize("graph", ["full", "window:3", "dilated:2:3", "strided:3:4", "sink:2:3"])
def test_transformer_masks_attention_by_the_graph(graph, pos, arrangement):
    model = GPT(tiny_config("attention", graph=graph, pos=pos, block_size=16)).eval()
    attn = model.blocks[0].mixer
    if pos == "rel":
        with torch.no_grad():
            attn.distance_bias.normal_()
    T = 14
    x = torch.randn(2, T, 16)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for j, i in defined_edges(graph, T):
        mask[i, j] = True
    torch.testing.assert_close(attn(x), boolean_mask_attention(attn, x, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixer", DENSE_LAYERS)
def test_an_edge_dim_of_the_gnn_kwargs_reads_distances_in_both_backends(mixer):
    fast, pyg = model_pair(mixer, {"edge_dim": 1})  # absolute positions: the distances come from the kwargs
    conv = pyg_layer(fast.blocks[0])
    assert fast.blocks[0].mixer.dense and conv.lin_edge is not None
    assert getattr(conv, "fill_value", 0.0) == 0.0  # the GATs re-add self-loops at distance 0; TransformerConv none
    idx, targets = torch.randint(0, 17, (2, 2, 12))
    assert_same_outputs_and_grads(fast, pyg, idx, targets)


@pytest.mark.parametrize("mixer,kwargs,reason", [
    ("GATConv", {"edge_dim": 1, "fill_value": "mean"},
     "GATConv with fill_value='mean' (self-loops re-added with a feature other than distance 0)"),
    ("GATv2Conv", {"edge_dim": 2}, "GATv2Conv with edge_dim=2 (the dense form reads one feature, the distance)"),
])
def test_an_edge_feature_other_than_the_distance_runs_on_pyg_and_says_so(mixer, kwargs, reason):
    model = GPT(tiny_config(mixer, mixer_kwargs=kwargs))
    token_mixer = model.blocks[0].mixer
    assert not token_mixer.dense and not model.supports_cache and token_mixer.dense_refusal == reason


@pytest.mark.parametrize("graph,pos", [("full", "abs")] + [(graph, "rel") for graph in GRAPHS])
def test_chunked_gatv2_kernel_with_many_chunks(graph, pos, monkeypatch):
    monkeypatch.setattr(fast_gat, "CHUNK_ELEMENTS", 64)  # one query per chunk, each with its own distances
    fast, pyg = model_pair("GATv2Conv", {}, graph=graph, pos=pos, block_size=12)
    idx, targets = torch.randint(0, 17, (2, 3, 12))
    assert_same_outputs_and_grads(fast, pyg, idx, targets)


def test_the_compiler_check_looks_for_the_compiler_torch_runs_alone(monkeypatch):
    monkeypatch.setattr(fast_gat.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "clang++" else None)
    monkeypatch.setattr(fast_gat.sys, "platform", "linux")
    monkeypatch.delenv("CXX", raising=False)
    assert not fast_gat.compiler_available()  # torch's inductor runs g++ here, and no other
    monkeypatch.setenv("CXX", "clang++")
    assert fast_gat.compiler_available()
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert not fast_gat.compiler_available()
    monkeypatch.setattr(fast_gat.sys, "platform", "darwin")
    monkeypatch.delenv("CXX")
    assert fast_gat.compiler_available()  # clang++ on macOS


def test_a_model_is_compiled_in_place_and_without_the_cuda_runtime_warning(monkeypatch):
    logger = logging.getLogger("torch.utils.cpp_extension")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    model = GPT(tiny_config("GATConv", block_size=8))
    keys = list(model.state_dict())
    assert fast_gat.compiled(model) is model and list(model.state_dict()) == keys  # its checkpoints stay the same
    assert model._compiled_call_impl is not None  # what nn.Module.compile sets: its calls go through torch.compile
    assert logger.getEffectiveLevel() == logging.ERROR  # "No CUDA runtime is found" on a CPU machine is a warning


@pytest.mark.fused_kernel
@pytest.mark.skipif(not fast_gat.compiler_available(), reason="no C++ compiler for torch.compile")
def test_fused_gatv2_kernel_equals_pyg():
    fast, pyg = model_pair("GATv2Conv", {}, block_size=12)
    idx, targets = torch.randint(0, 17, (2, 3, 12))
    assert_same_outputs_and_grads(fast, pyg, idx, targets)
    assert fast_gat.FUSED_GATV2.on  # computed by the fused kernels, not by the chunked one after a failure


@pytest.mark.fused_kernel
@pytest.mark.skipif(not fast_gat.compiler_available(), reason="no C++ compiler for torch.compile")
@pytest.mark.parametrize("graph", GRAPHS)
def test_fused_gatv2_kernel_with_relative_positions_equals_pyg_on_every_graph(graph, arrangement):
    fast, pyg = model_pair("GATv2Conv", {}, graph=graph, pos="rel", block_size=16)
    idx, targets = torch.randint(0, 17, (2, 2, 14))
    assert_same_outputs_and_grads(fast, pyg, idx, targets)
    assert fast_gat.FUSED_GATV2.on  # computed by the fused kernels, not by the chunked one after a failure


def eager_fused_kernels(monkeypatch, failing=None):
    """The fused path of GATv2 with the kernels uncompiled (their arithmetic, not the compiler's, under test); the
    backward kernel named failing raises as a compiler might."""
    def fail(*args):
        raise RuntimeError("C++ compile error\nsee the log")

    kernels = {"queries": fast_gat.queries_gradient, "queries and att": fast_gat.queries_and_att_gradient,
               "edges": fast_gat.edges_gradient}
    monkeypatch.setattr(fast_gat, "FUSED_KERNEL", True)
    monkeypatch.setattr(fast_gat.FUSED_GATV2, "on", True)
    monkeypatch.setattr(fast_gat, "fused_gatv2_scores", lambda: fast_gat.gatv2_scores_expression)
    monkeypatch.setattr(fast_gat, "fused_edge_kernels", lambda: {**kernels, **({failing: fail} if failing else {})})


@pytest.mark.parametrize("graph", GRAPHS)
def test_the_fused_backward_of_relative_positions_equals_pyg_on_every_graph(graph, arrangement, monkeypatch):
    eager_fused_kernels(monkeypatch)
    fast, pyg = model_pair("GATv2Conv", {"negative_slope": 0.3}, graph=graph, pos="rel", block_size=16)
    idx, targets = torch.randint(0, 17, (2, 2, 14))
    assert_same_outputs_and_grads(fast, pyg, idx, targets)
    assert fast_gat.FUSED_GATV2.on


def test_a_fused_backward_kernel_that_raises_gives_way_to_the_chunked_kernel(monkeypatch, capsys, with_fallbacks):
    eager_fused_kernels(monkeypatch, failing="edges")
    fast, pyg = model_pair("GATv2Conv", {}, pos="rel", block_size=12)
    idx, targets = torch.randint(0, 17, (2, 3, 12))
    assert_same_outputs_and_grads(fast, pyg, idx, targets)
    assert capsys.readouterr().err == (
        "warning: the compiled GATv2 score kernel failed (RuntimeError: C++ compile error); GATv2 scores are "
        "computed by the chunked kernel (the same scores) from now on\n")
    assert not fast_gat.FUSED_GATV2.on


def test_a_fused_gatv2_kernel_that_raises_gives_way_to_the_chunked_kernel(monkeypatch, capsys, with_fallbacks):
    model = GPT(tiny_config("GATv2Conv", block_size=8))
    idx = torch.randint(0, 17, (2, 8))
    expected, _ = model(idx)  # the chunked kernel: the tests run without the fused one

    def failing_kernel(*args):
        raise RuntimeError("triton: out of resources: shared memory\nrequired 262144, hardware limit 232448")

    monkeypatch.setattr(fast_gat, "FUSED_KERNEL", True)
    monkeypatch.setattr(fast_gat, "fused_gatv2_scores", lambda: failing_kernel)
    monkeypatch.setattr(fast_gat.FUSED_GATV2, "on", True)
    for _ in range(2):
        torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=0)
    assert capsys.readouterr().err == (
        "warning: the compiled GATv2 score kernel failed (RuntimeError: triton: out of resources: shared memory); "
        "GATv2 scores are computed by the chunked kernel (the same scores) from now on\n")
    assert not fast_gat.FUSED_GATV2.on


@pytest.mark.parametrize("failing", ["forward", "backward"])
def test_an_input_the_chunked_kernel_refuses_too_leaves_the_fused_kernel_on(failing, monkeypatch, capsys,
                                                                           with_fallbacks):
    def fail(*args):
        raise RuntimeError("INDICES element is out of DATA bounds")

    def refuse(*args):
        raise IndexError("index 6 is out of bounds for dimension 0 with size 6")

    eager_fused_kernels(monkeypatch, failing="edges" if failing == "backward" else None)
    if failing == "forward":
        monkeypatch.setattr(fast_gat, "fused_gatv2_scores", lambda: fail)
    monkeypatch.setattr(fast_gat, "chunked_gatv2_scores", refuse)
    model = GPT(tiny_config("GATv2Conv", pos="rel", block_size=8))
    idx, targets = torch.randint(0, 17, (2, 2, 8))
    with pytest.raises(IndexError, match="index 6 is out of bounds"):
        model(idx, targets)[1].backward()
    assert fast_gat.FUSED_GATV2.on  # not the compiler's failure: the next input runs on the fused kernels
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("pos", ["abs", "rel"])
@pytest.mark.parametrize("mixer", DENSE_LAYERS)
def test_attention_dropout_spreads_the_logits_as_much_on_either_backend(mixer, pos):
    """The spread of the logits over draws of the attention weights' dropout (p = 0.5) is PyG's (a fast backend
    that dropped at half the rate was measured at about half of it)."""
    fast, pyg = model_pair(mixer, {}, dropout=0.5, pos=pos, graph="window:3,full")
    idx = torch.randint(0, 17, (2, 12))
    spread = {}
    for name, model in (("fast", fast.train()), ("pyg", pyg.train())):
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # the layer's own dropout of its attention weights alone stays on
        torch.manual_seed(0)
        with torch.no_grad():
            spread[name] = torch.stack([model(idx)[0] for _ in range(100)]).var(dim=0).mean()
    assert 0.85 < spread["fast"] / spread["pyg"] < 1.15


@pytest.mark.parametrize("backend", ["fast", "pyg"])
@pytest.mark.parametrize("mixer", DENSE_LAYERS)
def test_attention_dropout_keeps_both_backends_causal(mixer, backend, device):
    model = GPT(tiny_config(mixer, backend=backend, dropout=0.5)).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the layer's own dropout of its attention weights alone stays on
    idx = torch.randint(0, 17, (2, 12))
    torch.manual_seed(1)
    base, _ = model(idx)
    assert not torch.equal(model(idx)[0], base)  # another draw: the attention weights' dropout is really on
    for t in (3, 11):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 17
        torch.manual_seed(1)
        logits, _ = model(changed)
        if device.type == "cuda" and backend == "pyg":  # PyG sums messages with atomic adds there: not bitwise
            assert_close_relative(logits[:, :t], base[:, :t])
        else:
            assert torch.equal(logits[:, :t], base[:, :t])


@pytest.mark.parametrize("mixer", ["GATConv", "GATv2Conv"])
def test_training_gives_the_same_losses_with_either_backend(mixer):
    """With SGD: AdamW divides each gradient by its running size, so a parameter whose exact gradient is about
    zero (GATConv's att_dst, say) steps by the full learning rate in the direction of its rounding noise, and
    runs that differ only in rounding drift apart. Measured over 16 seeds on the CPU, AdamW at lr 1e-2 left
    2 of 32 seed and layer pairs more than 1e-4 apart, SGD none (all within 1e-6); on CUDA, where PyG adds
    with atomics, two AdamW runs of the pyg backend alone differed by 3e-4."""
    losses = {}
    torch.manual_seed(3)
    batches = [torch.randint(0, 17, (2, 4, 12)) for _ in range(10)]
    fast, pyg = model_pair(mixer, {})
    def sgd(model, lr):
        return torch.optim.SGD(model.parameters(), lr=lr)
    for name, model in (("fast", fast), ("pyg", pyg)):
        losses[name] = train_losses(model, batches, lr=0.3, optimizer=sgd)
    assert losses["fast"][-1] < losses["fast"][0]
    torch.testing.assert_close(losses["fast"], losses["pyg"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("mixer", ["attention", *DENSE_LAYERS])
def test_cached_decoding_equals_the_lectures_sampler_at_every_step_over_three_windows(mixer, device):
    model = GPT(tiny_config(mixer, block_size=8)).eval()
    assert model.supports_cache
    tokens = torch.randint(0, 17, (30, 2, 1))  # 3 + 30 tokens: over three windows of 8 (four, begun)
    decoder = assert_cached_decoding_equals_full(model, torch.randint(0, 17, (2, 3)), tokens)
    # CUDA replays the one-token step and the full window's pass from graphs
    expected = {("cached_pass", (2, 1)), ("full_pass", (2, 8))} if device.type == "cuda" else set()
    assert set(decoder.graphs) == expected


@pytest.mark.parametrize("graph", ["window:3", "dilated:2:2", "strided:3:4", "sink:2:3", "window:2,full"])
@pytest.mark.parametrize("mixer", ["attention", *DENSE_LAYERS])
def test_cached_decoding_on_every_graph_with_absolute_positions_equals_the_lectures_sampler(mixer, graph, device):
    model = GPT(tiny_config(mixer, graph=graph, block_size=8)).eval()
    decoder = assert_cached_decoding_equals_full(model, torch.randint(0, 17, (2, 3)), torch.randint(0, 17, (22, 2, 1)))
    assert not decoder.rolling


@pytest.mark.parametrize("graph,capacities", [("window:3", [2 + 8, 2 + 8]), ("dilated:2:3", [3 + 8, 3 + 8]),
                                              ("window:2,dilated:2:2", [1 + 8, 2 + 8])])
@pytest.mark.parametrize("mixer", ["attention", *DENSE_LAYERS])
def test_rolling_cache_with_relative_positions_equals_the_lectures_sampler_for_ten_windows(mixer, graph, capacities,
                                                                                        device):
    model = GPT(tiny_config(mixer, graph=graph, pos="rel", block_size=8)).eval()
    randomize_distance_terms(model)
    tokens = torch.randint(0, 17, (85, 2, 1))  # 5 + 85 tokens: over eleven windows of 8
    decoder = assert_cached_decoding_equals_full(model, torch.randint(0, 17, (2, 5)), tokens)
    assert decoder.rolling and decoder.capacities == capacities  # each layer holds its reach and one pass of 8


@pytest.mark.skipif(not fast_gat.compiler_available(), reason="no C++ compiler for torch.compile")
def test_a_compiled_one_token_step_decodes_as_the_lectures_sampler(device):
    model = GPT(tiny_config("GATConv", graph="window:3", pos="rel", block_size=8)).eval()
    randomize_distance_terms(model)
    decoder = assert_cached_decoding_equals_full(model, torch.randint(0, 17, (2, 5)), torch.randint(0, 17, (20, 2, 1)),
                                                 compile=True)
    assert (decoder.one_token_pass != decoder.cached_pass) == (device.type != "cuda")  # compiled off CUDA


@pytest.mark.parametrize("graph,rolling", [("window:4,window:5", True), ("window:5,window:5", False)])
def test_rolling_buffers_serve_up_to_a_reach_of_block_size_minus_one(graph, rolling, device):
    model = GPT(tiny_config("attention", graph=graph, pos="rel", block_size=8)).eval()  # reach 7, then 8
    randomize_distance_terms(model)
    decoder = assert_cached_decoding_equals_full(model, torch.randint(0, 17, (1, 3)), torch.randint(0, 17, (30, 1, 1)))
    assert decoder.rolling == rolling


@pytest.mark.parametrize("pos", ["abs", "rel"])
@pytest.mark.parametrize("mixer", ["attention", *DENSE_LAYERS])
def test_decoding_equals_the_lectures_sampler_when_it_computes_in_bands(mixer, pos, small_chunks, device):
    model = GPT(tiny_config(mixer, graph="sink:1:3", pos=pos, block_size=16)).eval()  # banded from 8 tokens on
    randomize_distance_terms(model)
    assert_cached_decoding_equals_full(model, torch.randint(0, 17, (2, 3)), torch.randint(0, 17, (20, 2, 1)))


@pytest.mark.fused_kernel
@pytest.mark.skipif(not fast_gat.compiler_available(), reason="no C++ compiler for torch.compile")
def test_decoding_with_the_compiled_gatv2_kernel_equals_the_lectures_sampler(device):
    model = GPT(tiny_config("GATv2Conv", block_size=8)).eval()  # its window passes run the compiled kernel
    assert_cached_decoding_equals_full(model, torch.randint(0, 17, (1, 3)), torch.randint(0, 17, (12, 1, 1)))
    assert fast_gat.FUSED_GATV2.on  # its window passes ran the compiled kernel, not the chunked one after a failure


def test_a_long_prompt_fills_the_rolling_buffers_in_pieces(monkeypatch, device):
    monkeypatch.setattr("gnngpt.decoder.PIECE", 3)
    model = GPT(tiny_config("GATv2Conv", graph="window:3", pos="rel", block_size=8)).eval()
    decoder = assert_cached_decoding_equals_full(model, torch.randint(0, 17, (1, 11)), torch.randint(0, 17, (20, 1, 1)))
    assert decoder.capacities == [2 + 3, 2 + 3]


@pytest.mark.parametrize("graph", ["full", "sink:2:3", "strided:3:4", "window:5"])  # window:5: 2 layers reach 8
@pytest.mark.parametrize("mixer", ["attention", *DENSE_LAYERS])
def test_relative_positions_on_graphs_that_reach_the_whole_context_decode_exactly_without_rolling(mixer, graph,
                                                                                                  device):
    model = GPT(tiny_config(mixer, graph=graph, pos="rel", block_size=8)).eval()
    randomize_distance_terms(model)
    decoder = assert_cached_decoding_equals_full(model, torch.randint(0, 17, (2, 3)), torch.randint(0, 17, (22, 2, 1)))
    assert not decoder.rolling


@pytest.mark.parametrize("prompt_len", [8, 11])
def test_a_prompt_of_a_full_window_or_more_decodes_as_the_lectures_sampler(prompt_len, device):
    model = GPT(tiny_config("GATv2Conv", block_size=8)).eval()
    assert_cached_decoding_equals_full(model, torch.randint(0, 17, (1, prompt_len)), torch.randint(0, 17, (12, 1, 1)))


@pytest.mark.parametrize("double,error", [(capture_that_raises, CAPTURE_ERROR),
                                          (capture_whose_replay_raises, REPLAY_ERROR)], ids=["capture", "replay"])
@pytest.mark.parametrize("mixer,graph,pos,prompt_len", [
    ("attention", "full", "abs", 3),  # the one-token step fails
    ("GATv2Conv", "full", "abs", 8),  # the pass over the full window fails
    ("GATConv", "window:3", "rel", 5),  # the rolling buffers' one-token step fails
])
def test_a_cuda_graph_that_raises_gives_way_to_eager_decoding_with_the_same_logits(
        mixer, graph, pos, prompt_len, double, error, capture_anywhere, capsys, device, with_fallbacks):
    capture_anywhere(double)
    model = GPT(tiny_config(mixer, graph=graph, pos=pos, block_size=8)).eval()
    randomize_distance_terms(model)
    decoder = assert_cached_decoding_equals_full(model, torch.randint(0, 17, (2, prompt_len)),
                                                 torch.randint(0, 17, (20, 2, 1)))
    assert capsys.readouterr().err == cuda_graph_warning(error)  # once, in one line
    assert not CUDA_GRAPHS.on and decoder.graphs == {}


def test_with_no_fallback_a_cuda_graph_that_raises_fails_the_decoding(capture_anywhere, monkeypatch, device):
    capture_anywhere(capture_that_raises)
    monkeypatch.setenv(NO_FALLBACK, "1")  # as the CUDA checks run
    decoder = CachedDecoder(GPT(tiny_config("attention", block_size=8)).eval())
    decoder.start(torch.randint(0, 17, (1, 3)))
    decoder.append(torch.randint(0, 17, (1, 1)))
    with pytest.raises(RuntimeError, match=CAPTURE_ERROR):
        decoder.append(torch.randint(0, 17, (1, 1)))  # the one-token step's shape comes a second time
    assert CUDA_GRAPHS.on


def test_cache_refuses_more_tokens_than_it_holds(device):
    model = GPT(tiny_config("GATConv", block_size=8)).eval()
    with pytest.raises(ValueError, match="9 tokens do not fit a cache of 8"):
        model(torch.zeros((1, 9), dtype=torch.long), cache=KVCache(model.graphs, [8, 8], device))


@pytest.mark.parametrize("mixer", ["attention", *DENSE_LAYERS])
def test_cached_sampling_draws_what_the_lectures_sampler_draws(mixer, device):
    model = GPT(tiny_config(mixer, block_size=8)).eval()
    start = torch.zeros((1, 1), dtype=torch.long)
    cached = generate(model, start, 40, generator=torch.Generator(device).manual_seed(5))
    full = generate(model, start, 40, generator=torch.Generator(device).manual_seed(5), use_cache=False)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("pos", ["abs", "rel"])
def test_the_uncached_sampler_reads_the_last_block_size_tokens_of_a_longer_prompt(pos, device):
    model = GPT(tiny_config("GATv2Conv", backend="pyg", pos=pos, block_size=8)).eval()
    prompt = torch.randint(0, 17, (2, 11))
    drawn = generate(model, prompt, 6, top_k=1, use_cache=False)
    sequence = prompt
    for _ in range(6):  # the lecture's greedy sampler, written out
        logits, _ = model(sequence[:, -8:])
        sequence = torch.cat((sequence, logits[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    assert torch.equal(drawn, sequence)


def test_pyg_backend_has_no_cache_and_generates_in_full(device):
    model = GPT(tiny_config("GATConv", backend="pyg")).eval()
    assert not model.supports_cache
    with pytest.raises(ValueError, match="only the fast backend"):
        model(torch.zeros((1, 1), dtype=torch.long), cache=KVCache(model.graphs, [model.context_size] * 2, device))
    assert generate(model, torch.zeros((1, 1), dtype=torch.long), 20).shape == (1, 21)
