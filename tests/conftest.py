import functools
import random

import pytest
import torch

from gnngpt.decoder import CachedDecoder
from gnngpt.models import GPTConfig
from gnngpt.train import make_optimizer


def pytest_addoption(parser):
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu",
                     help="where the tests that take the device fixture run (default: cpu)")


@pytest.fixture(scope="session")
def device(request):
    """The --device of this pytest run: python -m pytest --device cuda tests/test_fast_backend.py on a GPU."""
    name = request.config.getoption("--device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.exit("--device cuda needs a CUDA GPU; run without --device here", returncode=2)
    return torch.device(name)


def write_tiny_text(path):
    """A few kilobytes of made-up text: enough for tiny models, no network, no real data."""
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    lines = [" ".join(rng.choice(words) for _ in range(8)).capitalize() + "." for _ in range(300)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_text_file(tmp_path):
    return write_tiny_text(tmp_path / "tiny.txt")


def train_losses(model, batches, lr, optimizer=make_optimizer):
    """The training loss of each step of model over batches, a sequence of (x, y), with the project's AdamW
    or optimizer(model, lr)."""
    opt = optimizer(model, lr)
    losses = []
    for x, y in batches:
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_cached_decoding_equals_full(model, prompt, tokens):
    """Decode prompt (B, T), then each of tokens (N, B, 1), with a CachedDecoder: at every step its logits equal
    (1e-4) those of the lecture's sampler, a plain forward pass over the last block_size tokens of the sequence
    so far, kept here apart from the decoder. Returns the decoder."""
    decoder = CachedDecoder(model)
    sequence = prompt
    logits = decoder.start(prompt)
    for token in [*tokens, None]:
        reference, _ = model(sequence[:, -model.config.block_size:])
        torch.testing.assert_close(logits, reference[:, -1], rtol=0, atol=1e-4)
        if token is not None:
            sequence = torch.cat((sequence, token), dim=1)
            logits = decoder.append(token)
    return decoder


def defined_edges(spec, T):
    """The edges (j, i) of one sequence of T tokens, straight from each graph's definition."""
    kind, *p = spec.split(":")
    p = [int(v) for v in p]
    edges = set()
    for i in range(T):
        for j in range(i + 1):
            if kind == "full":
                keep = True
            elif kind == "window":
                keep = i - p[0] < j
            elif kind == "dilated":
                keep = any(j == i - k * p[1] for k in range(p[0]))
            elif kind == "strided":
                keep = i - p[0] < j or (i - j) % p[1] == 0
            else:
                keep = j < p[0] or i - p[1] < j
            if keep:
                edges.add((j, i))
    return edges


TINY_SIZES = ["--n_embd", "16", "--n_head", "2", "--n_layer", "2"]  # the model sizes of tiny_config


def tiny_config(mixer, **overrides):
    cfg = dict(vocab_size=17, block_size=12, n_embd=16, n_head=2, n_layer=2, dropout=0.0, mixer=mixer)
    cfg.update(overrides)
    return GPTConfig(**cfg)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """tiny_run(name): the directory of a 2-step run of bigram, gpt or a graph layer, trained once per session.

    Its data is write_tiny_text's; tests must not change the run.
    """
    from gnngpt.cli import main
    from gnngpt.config import script_for

    root = tmp_path_factory.mktemp("tiny_runs")
    data = write_tiny_text(root / "tiny.txt")

    @functools.cache
    def train(name):
        script = script_for(name)
        argv = ["--max_iters", "2", "--eval_interval", "1", "--eval_iters", "1", "--batch_size", "2",
                "--block_size", "16", "--device", "cpu", "--data", str(data), "--out_dir", str(root / name)]
        argv += ["--n_embd", "16", "--n_head", "2", "--n_layer", "2"] if script.has_model_size else []
        argv += ["--gat_version", name] if script.graph_layer else []
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)  # the run's sample goes to root/model_outputs
            mp.setattr("gnngpt.sampling.SAMPLE_LENGTH", 20)  # a short one: these runs are for reading back
            assert main(script, argv) == 0
        return root / name

    return train


@pytest.fixture
def small_chunks(monkeypatch):
    """Banded layouts of chunks of 4 queries, so that graphs with a window take the banded path at test sizes."""
    from gnngpt import layout

    monkeypatch.setattr(layout, "MIN_CHUNK", 4)
    layout.cached_layout.cache_clear()
    yield
    layout.cached_layout.cache_clear()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _eager_gatv2_kernel(request, monkeypatch):
    """Compiling the fused GATv2 kernel for every test shape is slow: tests use the eager chunked kernel,
    except those marked fused_kernel (and scripts run in subprocesses, which compile it)."""
    if "fused_kernel" not in request.keywords:
        monkeypatch.setattr("gnngpt.fast_gat.fused_gatv2_scores", None)
