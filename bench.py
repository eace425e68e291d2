"""Benchmark training steps and generation of every model and backend, side by side in one process.

    python bench.py                      # the preset of this device (cpu on a CPU, paper on CUDA)
    python bench.py --preset paper --device cuda --iters 20 --json

Training: each round times one AdamW step of every model in turn (random tokens at the preset's batch and
block size, vocabulary 65), so that load on the machine hits all of them alike; the table reports medians.
"no-mixer" is the GPT without token mixing: what every model spends outside attention, the floor of any backend.
Peak memory is that of one training step: torch.cuda.max_memory_allocated on CUDA, the PyTorch profiler's
memory timeline on the CPU. Generation: 500 characters from one start token, with the cached decoder and with
the lecture's sampler (a full forward pass over the last block_size tokens for every character), both exact;
medians of --gen_repeats rounds that each run every model in turn. It runs in float32 whatever --dtype says,
as sample.py does.
"""
import json
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from gnngpt.cli import ArgumentParser, check_dtype, resolve_device
from gnngpt.config import PRESETS, resolve_preset
from gnngpt.errors import UsageError, exit_code
from gnngpt.mixers import GAT_LAYERS
from gnngpt.models import GPT, BigramConfig, BigramLanguageModel, GPTConfig
from gnngpt.sampling import generate
from gnngpt.train import autocast, make_optimizer, synchronize

VOCAB_SIZE = 65  # tinyshakespeare's
MODELS = [("bigram", "-"), ("gpt", "-"), ("GATConv", "fast"), ("GATConv", "pyg"),
          ("GATv2Conv", "fast"), ("GATv2Conv", "pyg"), ("no-mixer", "-")]
GENERATION_MODELS = [("gpt", "-"), ("GATConv", "fast"), ("GATv2Conv", "fast")]
GENERATION_LENGTH = 500


class NoMixer(torch.nn.Module):
    """A token mixer that mixes nothing (it adds zero), for the part of a training step every GPT shares."""

    def forward(self, x, cache=None):
        return torch.zeros_like(x)


def build(name, backend, settings, device):
    """A freshly initialised model of the preset's size, in training mode on device.

    "no-mixer" is the GPT with every token mixer replaced by NoMixer: its step time (embeddings, layer norms,
    feed-forward nets, head, loss, optimizer) is a floor that no attention backend can go below.
    """
    torch.manual_seed(1337)
    if name == "bigram":
        return BigramLanguageModel(BigramConfig(VOCAB_SIZE)).to(device)
    mixer = name if name in GAT_LAYERS else "attention"
    cfg = GPTConfig.from_settings(settings, VOCAB_SIZE, mixer=mixer, backend="fast" if backend == "-" else backend)
    model = GPT(cfg)
    if name == "no-mixer":
        for block in model.blocks:
            block.mixer = NoMixer()
    return model.to(device)


class TrainingBench:
    """One model, its optimizer and a fixed random batch, stepped and timed on demand."""

    def __init__(self, name, backend, settings, device, dtype, compile_model):
        self.name, self.backend, self.device, self.dtype = name, backend, device, dtype
        s = settings["bigram" if name == "bigram" else "gpt"]
        self.tokens = s["batch_size"] * s["block_size"]
        self.model = build(name, backend, s, device)
        if compile_model:
            self.model.compile()
        self.optimizer = make_optimizer(self.model, s["learning_rate"])
        self.x, self.y = torch.randint(VOCAB_SIZE, (2, s["batch_size"], s["block_size"]), device=device)
        self.times = []

    def step(self):
        with autocast(self.device, self.dtype):
            _, loss = self.model(self.x, self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def timed_step(self):
        synchronize(self.device)
        t0 = time.perf_counter()
        self.step()
        synchronize(self.device)
        self.times.append(time.perf_counter() - t0)

    def peak_memory_mb(self):
        """Peak memory of the tensors alive during one training step, in MiB (None where it cannot be read)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            self.step()
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            self.step()
        try:  # the profiler's memory timeline is a private API that may change between torch releases
            from torch.profiler._memory_profiler import MemoryProfileTimeline

            _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(self.device)
        except (ImportError, AttributeError):
            return None
        return max(sum(s) for s in sizes) / 2**20

    def row(self, preset):
        ms = statistics.median(self.times) * 1e3
        peak = self.peak_memory_mb()
        return {"model": self.name, "backend": self.backend, "preset": preset, "device": str(self.device),
                "dtype": self.dtype, "task": "train", "ms_per_iter": round(ms, 2),
                "tokens_per_s": round(self.tokens / ms * 1e3, 1),
                "peak_mem_mb": None if peak is None else round(peak, 1)}


def time_generation(model, device, use_cache):
    start = torch.zeros((1, 1), dtype=torch.long, device=device)
    synchronize(device)
    t0 = time.perf_counter()
    generate(model, start, GENERATION_LENGTH, generator=None, use_cache=use_cache)
    synchronize(device)
    return time.perf_counter() - t0


def bench_generation(preset, settings, device, repeats):
    """Each round generates with every model in turn, cached then with the lecture's sampler, as the training
    rounds alternate."""
    models = [build(name, backend, settings["gpt"], device).eval() for name, backend in GENERATION_MODELS]
    times = {(i, use_cache): [] for i in range(len(models)) for use_cache in (True, False)}
    for _ in tqdm(range(repeats), desc="generation rounds", leave=False):
        for i, model in enumerate(models):
            for use_cache in (True, False):
                times[i, use_cache].append(time_generation(model, device, use_cache))
    rows = []
    for i, (name, backend) in enumerate(GENERATION_MODELS):
        cached, full = (round(statistics.median(times[i, c]) * 1e3, 1) for c in (True, False))
        rows.append({"model": name, "backend": backend, "preset": preset, "device": str(device),
                     "dtype": "float32", "task": "generate", "chars": GENERATION_LENGTH, "cached_ms": cached,
                     "full_ms": full, "cached_chars_per_s": round(GENERATION_LENGTH / cached * 1e3, 1),
                     "full_chars_per_s": round(GENERATION_LENGTH / full * 1e3, 1),
                     "speedup": round(full / cached, 2)})
    return rows


def ratios(train_rows):
    """Each (description, measured value) that compares two training rows."""
    ms = {(r["model"], r["backend"]): r["ms_per_iter"] for r in train_rows}
    mem = {(r["model"], r["backend"]): r["peak_mem_mb"] for r in train_rows}
    rows = [
        ("GATConv fast speed-up over pyg", ms["GATConv", "pyg"] / ms["GATConv", "fast"]),
        ("GATv2Conv fast speed-up over pyg", ms["GATv2Conv", "pyg"] / ms["GATv2Conv", "fast"]),
        ("GATConv fast time / gpt time", ms["GATConv", "fast"] / ms["gpt", "-"]),
        ("GATv2Conv fast time / gpt time", ms["GATv2Conv", "fast"] / ms["gpt", "-"]),
        ("GATConv pyg time / no-mixer time: the most any GATConv backend can gain over pyg",
         ms["GATConv", "pyg"] / ms["no-mixer", "-"]),
    ]
    if mem["GATv2Conv", "fast"] is not None:
        rows.append(("GATv2Conv fast peak memory / pyg", mem["GATv2Conv", "fast"] / mem["GATv2Conv", "pyg"]))
    return rows


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("auto", "cpu", "paper"), default="auto",
                   help="model and batch shapes: auto picks paper on CUDA, cpu otherwise (default: auto)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: auto)")
    p.add_argument("--iters", type=int, default=10, help="timed training steps per model (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (default: 3)")
    p.add_argument("--gen_repeats", type=int, default=3, help="timed generations per model and mode (default: 3)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: autocast the forward passes to bf16 (CUDA only; default: float32)")
    p.add_argument("--json", action="store_true", help="also print one JSON object per result row")
    return exit_code(run, p.parse_args(argv))


def run(args):
    for key in ("iters", "gen_repeats"):
        if getattr(args, key) <= 0:
            raise UsageError(f"--{key} must be a positive integer, got {getattr(args, key)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be zero or more, got {args.warmup}")
    device = resolve_device(args.device)
    check_dtype(args.dtype, device)
    preset = resolve_preset(args.preset, device)
    settings = PRESETS[preset]
    print(f"preset {preset}, device {device}, {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    benches = [TrainingBench(n, b, settings, device, args.dtype, args.compile) for n, b in MODELS]
    for bench in tqdm(benches, desc="warm-up", leave=False):
        for _ in range(args.warmup):
            bench.step()
    for _ in tqdm(range(args.iters), desc="training steps", leave=False):
        for bench in benches:
            bench.timed_step()
    train_rows = [b.row(preset) for b in benches]
    del benches
    gen_rows = bench_generation(preset, settings, device, args.gen_repeats)

    print("\n| model | backend | ms/iter | tokens/s | peak MiB |\n| --- | --- | --- | --- | --- |")
    for r in train_rows:
        peak = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        print(f"| {r['model']} | {r['backend']} | {r['ms_per_iter']:.1f} | {r['tokens_per_s']:,.0f} | {peak} |")
    print(f"\n| generate {GENERATION_LENGTH} chars | cached ms | cached chars/s | lecture's sampler ms | "
          f"lecture's sampler chars/s | speed-up |\n| --- | --- | --- | --- | --- | --- |")
    for r in gen_rows:
        print(f"| {r['model']} {r['backend']} | {r['cached_ms']:.0f} | {r['cached_chars_per_s']:.0f} | "
              f"{r['full_ms']:.0f} | {r['full_chars_per_s']:.0f} | {r['speedup']:.2f}x |")
    print("\n| ratio | measured |\n| --- | --- |")
    for text, value in ratios(train_rows):
        print(f"| {text} | {value:.2f} |")
    if args.json:
        for r in train_rows + gen_rows:
            print(json.dumps(r))


if __name__ == "__main__":
    sys.exit(main())
