"""What bench.py measures and prints: models built for timing, training steps and generations timed side by side,
and the tables and ratios of one run's measurements."""
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from gnngpt.errors import UsageError
from gnngpt.fast_gat import compiled
from gnngpt.lists import list_items, refuse_twice
from gnngpt.mixers import DENSE_LAYERS
from gnngpt.models import GPT, BigramConfig, BigramLanguageModel, GPTConfig
from gnngpt.sampling import sample_tokens
from gnngpt.train import autocast, make_optimizer, synchronize

VOCAB_SIZE = 65  # tinyshakespeare's
MODELS = [("bigram", "-"), ("gpt", "-"), ("GATConv", "fast"), ("GATConv", "pyg"), ("GATv2Conv", "fast"),
          ("GATv2Conv", "pyg"), ("TransformerConv", "fast"), ("TransformerConv", "pyg"), ("no-mixer", "-")]
GRAPHLESS = {"bigram", "no-mixer"}  # benchmarked once, not per graph
GENERATORS = [("gpt", "-"), *((name, "fast") for name in DENSE_LAYERS)]
MATRIX_PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"}


class NoMixer(torch.nn.Module):
    """A token mixer that mixes nothing (it adds zero), for the part of a training step every GPT shares."""

    def forward(self, x, cache=None):
        return torch.zeros_like(x)


def build(name, backend, settings, device):
    """A freshly initialised model of the settings' size, graph and positions, in training mode on device.

    "no-mixer" is the GPT with every token mixer replaced by NoMixer: its step time (embeddings, layer norms,
    feed-forward nets, head, loss, optimizer) is a floor that no attention backend can go below.
    """
    torch.manual_seed(1337)
    if name == "bigram":
        return BigramLanguageModel(BigramConfig(VOCAB_SIZE)).to(device)
    mixer = name if name in DENSE_LAYERS else "attention"
    cfg = GPTConfig.from_settings(settings, VOCAB_SIZE, mixer=mixer, backend="fast" if backend == "-" else backend)
    model = GPT(cfg)
    if name == "no-mixer":
        for block in model.blocks:
            block.mixer = NoMixer()
    return model.to(device)


class TrainingBench:
    """One model on one graph, its optimizer and a fixed random batch, stepped and timed on demand."""

    def __init__(self, name, backend, settings, device, dtype, compile_model):
        self.name, self.backend, self.device, self.dtype = name, backend, device, dtype
        self.graph, self.pos = ("-", "-") if name in GRAPHLESS else (settings["graph"], settings["pos"])
        self.tokens = settings["batch_size"] * settings["block_size"]
        self.model = build(name, backend, settings, device)
        if compile_model:
            compiled(self.model)
        self.optimizer = make_optimizer(self.model, settings["learning_rate"])
        self.x, self.y = torch.randint(VOCAB_SIZE, (2, settings["batch_size"], settings["block_size"]),
                                       device=device)
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
        self.optimizer.zero_grad(set_to_none=True)  # freed before: the profiler would warn of blocks it never saw
        with cpu_profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
            self.step()
        try:  # the profiler's memory timeline is a private API that may change between torch releases
            from torch.profiler._memory_profiler import MemoryProfileTimeline

            _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(self.device)
        except (ImportError, AttributeError):
            return None
        return max(sum(s) for s in sizes) / 2**20

    def time_spent(self, steps):
        """Where steps more training steps spend their time, in ms a step of self CPU time by the PyTorch profiler:
        in all operators, in matrix products (MATRIX_PRODUCTS) and in scaled_dot_product_attention's kernels."""
        with cpu_profile() as prof:
            for _ in range(steps):
                self.step()
        ms = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
        return {"profiled_ms": round(sum(ms.values()), 2),
                "matmul_ms": round(sum(t for op, t in ms.items() if op in MATRIX_PRODUCTS), 2),
                "sdpa_ms": round(sum(t for op, t in ms.items() if "scaled_dot_product" in op), 2)}

    def row(self, common, profile_steps):
        ms = statistics.median(self.times) * 1e3
        peak = self.peak_memory_mb()
        return {"model": self.name, "backend": self.backend, "graph": self.graph, "pos": self.pos, **common,
                "task": "train", "dtype": self.dtype, "ms_per_iter": round(ms, 2),
                "tokens_per_s": round(self.tokens / ms * 1e3, 1),
                "peak_mem_mb": None if peak is None else round(peak, 1),
                **(self.time_spent(profile_steps) if profile_steps else {})}


def cpu_profile(**options):
    """The PyTorch profiler of CPU activity, quiet (else it logs its start and stop to stderr)."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    return profile(activities=[ProfilerActivity.CPU], **options)


def bench_training(models, device, dtype, compile_model, warmup, iters, common, profile_steps=0):
    """The training row of each (name, backend, settings): warmup untimed steps of each model, then iters rounds
    that each time one step of every model in turn, so that load on the machine hits all of them alike; with
    profile_steps, where that many more steps of each spend their time (TrainingBench.time_spent)."""
    benches = [TrainingBench(name, backend, settings, device, dtype, compile_model)
               for name, backend, settings in models]
    for bench in tqdm(benches, desc="warm-up", leave=False):
        for _ in range(warmup):
            bench.step()
    for _ in tqdm(range(iters), desc="training steps", leave=False):
        for bench in benches:
            bench.timed_step()
    return [b.row(common, profile_steps) for b in benches]


def time_generation(model, device, use_cache, length, compile_decoder):
    """Seconds to generate length characters from one start token, and the seconds of its first and last fifth."""
    start = torch.zeros((1, 1), dtype=torch.long, device=device)
    fifth = max(1, length // 5)
    stamps = []
    synchronize(device)
    t0 = time.perf_counter()
    for i, _ in enumerate(sample_tokens(model, start, length, use_cache=use_cache, compile=compile_decoder)):
        if i + 1 in (fifth, length - fifth, length):
            synchronize(device)
            stamps.append(time.perf_counter() - t0)
    first, before_last, total = stamps if len(stamps) == 3 else (stamps[0], 0.0, stamps[-1])
    return total, first, total - before_last


def bench_generation(configs, device, length, repeats, common, compile_decoder):
    """Each round generates with every model on every graph in turn, cached then with the lecture's sampler, as
    the training rounds alternate; one untimed round comes first (and compiles what is compiled)."""
    models = [(name, backend, s, build(name, backend, s, device).eval()) for s in configs
              for name, backend in GENERATORS if (name, backend) in s["models"]]
    times = {(i, cached): [] for i in range(len(models)) for cached in (True, False)}
    for round_ in tqdm(range(repeats + 1), desc="generation rounds", leave=False):
        for i, (*_, model) in enumerate(models):
            for cached in (True, False):
                measured = time_generation(model, device, cached, length, compile_decoder)
                if round_:
                    times[i, cached].append(measured)
    rows = []
    for i, (name, backend, s, _) in enumerate(models):
        (cached, first, last), (full, _, _) = (
            [round(statistics.median(t[k] for t in times[i, c]) * 1e3, 1) for k in range(3)] for c in (True, False))
        rows.append({"model": name, "backend": backend, "graph": s["graph"], "pos": s["pos"], **common,
                     "task": "generate", "dtype": "float32", "compiled": compile_decoder, "chars": length,
                     "cached_ms": cached, "full_ms": full,
                     "cached_chars_per_s": round(length / cached * 1e3, 1),
                     "full_chars_per_s": round(length / full * 1e3, 1), "speedup": round(full / cached, 2),
                     "cached_first_fifth_ms": first, "cached_last_fifth_ms": last})
    return rows


WITHIN = [  # (description, numerator, denominator) of training times on one graph
    *((f"{name} fast speed-up over pyg", (name, "pyg"), (name, "fast")) for name in DENSE_LAYERS),
    *((f"{name} fast time / gpt time", (name, "fast"), ("gpt", "-")) for name in DENSE_LAYERS),
]


def ratios(train_rows, gen_rows):
    """Each (description, measured value) that compares two measurements of this run."""
    out = []
    graphed = [r for r in train_rows if r["graph"] != "-"]
    floor = {r["model"]: r["ms_per_iter"] for r in train_rows if r["model"] == "no-mixer"}
    configs = list(dict.fromkeys((r["graph"], r["pos"]) for r in graphed))
    for graph, pos in configs:
        rows = {(r["model"], r["backend"]): r for r in graphed if (r["graph"], r["pos"]) == (graph, pos)}
        for text, a, b in WITHIN:
            if a in rows and b in rows:
                out.append((f"{text} [{graph} {pos}]", rows[a]["ms_per_iter"] / rows[b]["ms_per_iter"]))
        for name in DENSE_LAYERS:
            fast, pyg = rows.get((name, "fast")), rows.get((name, "pyg"))
            if fast and pyg and fast["peak_mem_mb"] and pyg["peak_mem_mb"]:
                out.append((f"{name} fast peak memory / pyg [{graph} {pos}]", fast["peak_mem_mb"] / pyg["peak_mem_mb"]))
        if ("GATConv", "pyg") in rows and floor:
            out.append((f"GATConv pyg time / no-mixer time: the most any GATConv backend can gain over pyg "
                        f"[{graph} {pos}]", rows["GATConv", "pyg"]["ms_per_iter"] / floor["no-mixer"]))
    first_graph = configs[0][0] if configs else None  # each other graph against it, with the same positions
    base = {(r["model"], r["backend"], r["pos"]): r for r in graphed if r["graph"] == first_graph}
    for r in graphed:
        b = base.get((r["model"], r["backend"], r["pos"]))
        if b is None or r["graph"] == first_graph:
            continue
        where = f"{r['model']} {r['backend']} on {r['graph']} {r['pos']} / on {b['graph']} {b['pos']}"
        out.append((f"{where}: tokens per second", r["tokens_per_s"] / b["tokens_per_s"]))
        if r["peak_mem_mb"] and b["peak_mem_mb"]:
            out.append((f"{where}: peak memory", r["peak_mem_mb"] / b["peak_mem_mb"]))
    absolute = {(r["model"], r["backend"], r["graph"]): r for r in graphed if r["pos"] == "abs"}
    for r in graphed:  # relative positions against absolute ones, same model, backend and graph
        a = absolute.get((r["model"], r["backend"], r["graph"]))
        if a is None or r["pos"] != "rel":
            continue
        where = f"{r['model']} {r['backend']} [{r['graph']}], relative / absolute positions"
        out.append((f"{where}: step time", r["ms_per_iter"] / a["ms_per_iter"]))
        if r["peak_mem_mb"] and a["peak_mem_mb"]:
            out.append((f"{where}: peak memory", r["peak_mem_mb"] / a["peak_mem_mb"]))
    for r in gen_rows:
        out.append((f"{r['model']} {r['backend']} [{r['graph']} {r['pos']}]: cached generation, last fifth / "
                    f"first fifth", r["cached_last_fifth_ms"] / r["cached_first_fifth_ms"]))
    return out


def selected_models(text):
    """The (model, backend) pairs of --models: names such as gpt, GATConv (both backends) or GATConv/pyg."""
    names = {name: [(m, b) for m, b in MODELS if m == name] for name, _ in MODELS}
    names |= {f"{m}/{b}": [(m, b)] for m, b in MODELS if b != "-"}
    chosen = []
    for item in list_items(text, "--models", "gpt,GATConv"):
        if item not in names:
            raise UsageError(f"--models: unknown model {item!r}; choose among {', '.join(names)}")
        chosen += names[item]
    refuse_twice(chosen, f"--models {text!r}", lambda model: "/".join(model) if model[1] != "-" else model[0])
    return [m for m in MODELS if m in chosen]


def print_tables(train_rows, gen_rows, gen_length, compiled):
    """The training table, the generation table (if any) and the ratio table, in Markdown."""
    print("\n| model | backend | graph | pos | ms/iter | tokens/s | peak MiB |\n" + "| --- " * 7 + "|")
    for r in train_rows:
        peak = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}"
        print(f"| {r['model']} | {r['backend']} | {r['graph']} | {r['pos']} | {r['ms_per_iter']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {peak} |")
    profiled = [r for r in train_rows if "profiled_ms" in r]
    if profiled:
        print("\n| where a step's time goes (ms, self CPU time) | graph | pos | all operators | matrix products | "
              "scaled_dot_product_attention | the rest |\n" + "| --- " * 7 + "|")
        for r in profiled:
            rest = r["profiled_ms"] - r["matmul_ms"] - r["sdpa_ms"]
            print(f"| {r['model']} {r['backend']} | {r['graph']} | {r['pos']} | {r['profiled_ms']:.1f} | "
                  f"{r['matmul_ms']:.1f} | {r['sdpa_ms']:.1f} | {rest:.1f} |")
    if gen_rows:
        step = ", one-token step compiled" if compiled else ""
        print(f"\n| generate {gen_length} chars{step} | graph | pos | cached ms | cached chars/s | "
              f"lecture's sampler ms | lecture's sampler chars/s | speed-up |\n" + "| --- " * 8 + "|")
        for r in gen_rows:
            print(f"| {r['model']} {r['backend']} | {r['graph']} | {r['pos']} | {r['cached_ms']:.0f} | "
                  f"{r['cached_chars_per_s']:.0f} | {r['full_ms']:.0f} | {r['full_chars_per_s']:.0f} | "
                  f"{r['speedup']:.2f}x |")
    measured = ratios(train_rows, gen_rows)
    if measured:  # none where no two of the models benchmarked compare
        print("\n| ratio | measured |\n| --- | --- |")
        for text, value in measured:
            print(f"| {text} | {value:.2f} |")
