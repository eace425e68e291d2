import functools
import json
import random
import struct
import zlib
from pathlib import Path

import numpy
import pytest
import scipy.stats
import torch

from gnngpt.decoder import CUDA_GRAPHS, CachedDecoder
from gnngpt.fallback import NO_FALLBACK
from gnngpt.models import GPTConfig
from gnngpt.train import make_optimizer


def t_interval(d):
    """The 95% Student-t interval of the mean of the paired differences d, by scipy; where they are all equal, the
    mean itself (an interval of no width, which scipy gives as nan)."""
    d = numpy.asarray(d)
    if numpy.all(d == d[0]):
        return d.mean(), d.mean()
    return scipy.stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=scipy.stats.sem(d))


def table_rows(markdown):
    """The cells of each row of the first markdown table, header and rule left out."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in lines[start + 2:end]]


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


@pytest.fixture
def in_tmp_path(tmp_path, monkeypatch):
    """Run in tmp_path, so that runs in the default runs/<name> and comparisons' samples in model_outputs go
    there, and keep samples short."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("gnngpt.sampling.SAMPLE_LENGTH", 20)
    return tmp_path


TINY_GPT_RUN = ["--eval_iters", "1", "--batch_size", "2", "--block_size", "8", "--device", "cpu",
                "--n_embd", "8", "--n_head", "2", "--n_layer", "1"]


def train_tiny_gpt(out, data, *args):
    """gpt.py's main on data into out at TINY_GPT_RUN's sizes, with args after them; its exit status."""
    from gnngpt.cli import main
    from gnngpt.config import GPT

    return main(GPT, ["--data", str(data), "--out_dir", str(out), *TINY_GPT_RUN, *args])


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


def assert_cached_decoding_equals_full(model, prompt, tokens, compile=False):
    """Decode prompt (B, T), then each of tokens (N, B, 1), with a CachedDecoder: at every step its logits equal
    (1e-4) those of the lecture's sampler, a plain forward pass over the last block_size tokens of the sequence
    so far, kept here apart from the decoder. Returns the decoder."""
    decoder = CachedDecoder(model, compile)
    sequence = prompt
    logits = decoder.start(prompt)
    for token in [*tokens, None]:
        reference, _ = model(sequence[:, -model.config.block_size:])
        torch.testing.assert_close(logits, reference[:, -1], rtol=0, atol=1e-4)
        if token is not None:
            sequence = torch.cat((sequence, token), dim=1)
            logits = decoder.append(token)
            assert decoder.window.size(1) <= model.config.block_size  # what a failed CUDA graph takes in again
    return decoder


CAPTURE_ERROR = "CUDA error: operation not permitted when stream is capturing"
REPLAY_ERROR = "CUDA error: an illegal memory access was encountered"


def cuda_graph_warning(error):
    """The one line a decoder prints where a CUDA graph raised error."""
    return (f"warning: capturing or replaying a decoding pass as a CUDA graph failed (RuntimeError: {error}); "
            f"decoding runs eagerly (the same logits) from now on\n")


def capture_that_raises(run_pass, idx):
    """A test double of decoder.capture that raises, as a capture does when a pass does what no capture allows."""
    raise RuntimeError(f"{CAPTURE_ERROR}\nCUDA kernel errors might be asynchronously reported at some other API call")


def capture_whose_replay_raises(run_pass, idx):
    """A test double of decoder.capture that runs the pass as the warm-up, then once more, as if its recording had
    run (the cache is a pass ahead of the tokens), and returns a replay that raises."""
    logits = run_pass(idx)
    run_pass(idx.clone())

    def replay(new_idx):
        raise RuntimeError(REPLAY_ERROR)

    return replay, logits


CACHE_ERROR = "CUDA error: misaligned address"
MULTINOMIAL_ERROR = "probability tensor contains either `inf`, `nan` or element < 0"
COMPILE_ERROR = "C++ compile error"
ALLOCATION_ERROR = "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory"


def failing_cache(cache, T):
    """A test double of KVCache.begin that raises: a failure inside the cached decoder."""
    raise RuntimeError(f"{CACHE_ERROR}\nCUDA kernel errors might be asynchronously reported at some other API call")


def failing_multinomial(*args, **kwargs):
    """A test double of torch.multinomial that raises: a failure of sampling outside the cached decoder."""
    raise RuntimeError(MULTINOMIAL_ERROR)


def allocation_fails(*args, **kwargs):
    """A test double of any call that allocates: memory running out, as torch's CPU allocator reports it."""
    raise RuntimeError(ALLOCATION_ERROR)


def build_fails(*args, **kwargs):
    """A test double of a compiled call whose kernels fail to build, as torch.compile raises it (with
    COMPILE_ERROR)."""
    from torch._dynamo.exc import BackendCompilerFailed

    raise BackendCompilerFailed(lambda: None, RuntimeError(f"{COMPILE_ERROR}\ng++ said more"), None)


@pytest.fixture
def with_fallbacks(monkeypatch):
    """An optimisation that raises steps aside in this test, even where the suite runs with GNNGPT_NO_FALLBACK=1
    (as the CUDA checks run it): for the tests of the fallbacks themselves."""
    monkeypatch.delenv(NO_FALLBACK, raising=False)


@pytest.fixture
def capture_anywhere(monkeypatch):
    """capture_anywhere(double): decoders decide to capture on any device (where the CUDA-graph path is chosen)
    and capture with double; CUDA_GRAPHS is on, and is put back as it was after the test."""

    def use(double):
        monkeypatch.setattr(CachedDecoder, "can_capture", lambda self, idx: True)
        monkeypatch.setattr("gnngpt.decoder.capture", double)
        monkeypatch.setattr(CUDA_GRAPHS, "on", True)

    return use


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


def randomize_distance_terms(model):
    """Random distance biases (they start at zero), so that a wrong distance changes the logits."""
    with torch.no_grad():
        for block in model.blocks:
            if getattr(block.mixer, "distance_bias", None) is not None:
                block.mixer.distance_bias.normal_()


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
        with pytest.MonkeyPatch.context() as mp:  # the run's sample goes to its directory, as sample.txt
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
        monkeypatch.setattr("gnngpt.fast_gat.FUSED_KERNEL", False)


def offline_wandb_env(home):
    """The environment of W&B without a network or an account, its own files under home: runs are logged to
    --out_dir/wandb, nothing is sent."""
    dirs = ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")
    return {"WANDB_MODE": "offline", "WANDB_SILENT": "true", **{name: str(Path(home) / name.lower()) for name in dirs}}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """This process and its children use W&B offline (offline_wandb_env); skipped where wandb is not installed."""
    pytest.importorskip("wandb")
    for name, value in offline_wandb_env(tmp_path / "wandb-home").items():
        monkeypatch.setenv(name, value)


WANDB_BLOCK, WANDB_CHUNK_HEADER = 32768, struct.Struct("<IHB")  # checksum, length, type
WANDB_FULL, WANDB_LAST = 1, 4  # chunk types that end a record


def wandb_records(path):
    """The records of a W&B run's transaction log (run-<id>.wandb), read as W&B's own reader did.

    After a 7-byte file header come blocks of 32 KiB; each record is split into chunks that do not cross a
    block (a tail too short for a chunk header is padding), each with the CRC-32 of its type and data.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), f"{path} is not a W&B transaction log"
    pos, record = 7, b""
    while pos + WANDB_CHUNK_HEADER.size <= len(data):
        left_in_block = WANDB_BLOCK - pos % WANDB_BLOCK
        if left_in_block < WANDB_CHUNK_HEADER.size:
            pos += left_in_block
            continue
        checksum, length, kind = WANDB_CHUNK_HEADER.unpack_from(data, pos)
        chunk = data[pos + WANDB_CHUNK_HEADER.size: pos + WANDB_CHUNK_HEADER.size + length]
        assert checksum == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"bad checksum at byte {pos} of {path}"
        pos += WANDB_CHUNK_HEADER.size + length
        record += chunk
        if kind in (WANDB_FULL, WANDB_LAST):
            yield wandb_internal_pb2.Record.FromString(record)
            record = b""


def wandb_runs(out_dir):
    """Each offline W&B run under out_dir/wandb, oldest first: its id, project, name and config, the values it
    logged at each step ({step: {key: value}}), the paths of the files attached to it and its exit code.

    The W&B service of this process is shut down first: it writes a finished run's log out only then, as it does
    when a training process ends.
    """
    import wandb

    wandb.teardown()
    runs = []
    for path in sorted(Path(out_dir).glob("wandb/offline-run-*/run-*.wandb")):
        run = {"history": {}, "files": set()}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, project=record.run.project, name=record.run.display_name,
                           config={item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "history":
                values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                          for item in record.history.item}
                run["history"][values.pop("_step")] = {k: v for k, v in values.items() if not k.startswith("_")}
            elif kind == "files":
                run["files"].update(f.path for f in record.files.files)
            elif kind == "exit":
                run["exit_code"] = record.exit.exit_code
        runs.append(run)
    return runs


def tensorboard_scalars(log_dir):
    """{tag: [(step, value), ...]} of the TensorBoard event files in log_dir, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
