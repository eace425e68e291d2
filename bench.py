"""Benchmark training steps and generation of every model, backend and context graph, side by side in one process.

    python bench.py                      # the preset of this device (cpu on a CPU, paper on CUDA)
    python bench.py --preset paper --device cuda --iters 20 --json
    python bench.py --device cpu --graphs full,window:64 --block_size 1024 --batch_size 4 --n_embd 128 --n_head 4 \\
        --n_layer 4 --models gpt,GATConv,GATv2Conv/fast,no-mixer --gen_repeats 0
    python bench.py --pos rel --graphs window:16 --block_size 128 --models gpt,GATConv/fast,GATv2Conv/fast \\
        --iters 1 --gen_length 5000 --gen_repeats 1

Training: each round times one AdamW step of every model in turn (random tokens, vocabulary 65, at the preset's
shape or the one the flags give), so that load on the machine hits all of them alike; the table reports medians.
Every model but the bigram runs on each graph of --graphs with each kind of positions of --pos. "no-mixer" is
the GPT without token mixing: what every model spends outside attention, the floor of any backend. Peak memory
is that of one training step: torch.cuda.max_memory_allocated on CUDA, the PyTorch profiler's memory timeline
on the CPU. Generation: --gen_length characters from one start token, with the cached decoder and with the
lecture's sampler (a full forward pass over the last block_size tokens for every character), both exact;
medians of --gen_repeats rounds that each run every model in turn, after one untimed round (it compiles the GATv2
kernel for the shapes of decoding); the time of the first and last fifth of the cached generation shows whether
a character costs the same late as early. Generation runs in float32 whatever --dtype says, as sample.py does;
--compile compiles the cached decoder's one-token step too (sample.py --compile), not the lecture's sampler.
On the CPU, --profile_steps N splits the self CPU time of N more training steps of each model into matrix
products, scaled_dot_product_attention's kernels and the rest.
"""
import json
import sys

from gnngpt.errors import UsageError, check_count, check_output, exit_code, fitting, quiet_interrupt

with quiet_interrupt(__name__ == "__main__"):  # importing torch takes seconds: Ctrl-C then ends in one line
    import torch

    from gnngpt.benchmark import GRAPHLESS, MODELS, bench_generation, bench_training, print_tables, selected_models
    from gnngpt.cli import (
        DEVICES,
        ArgumentParser,
        check_compile,
        check_dtype,
        check_heads,
        placement_list,
        refuse_placing_without_a_mixer,
        refuse_twice_placed,
        resolve_device,
    )
    from gnngpt.config import PRESETS, resolve_preset
    from gnngpt.fast_gat import compile_failures
    from gnngpt.graph import graph_spec, parse_graph

SHAPE_FLAGS = ("block_size", "batch_size", "n_embd", "n_head", "n_layer")


def build_parser():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("auto", "cpu", "paper"), default="auto",
                   help="model and batch shapes: auto picks paper on CUDA, cpu otherwise (default: auto)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="(default: auto)")
    for flag in SHAPE_FLAGS:
        p.add_argument(f"--{flag}", type=int, help="overrides the preset's (default: the preset's)")
    p.add_argument("--models", default=",".join(dict.fromkeys(m for m, _ in MODELS)),
                   help="comma-separated: bigram, gpt, GATConv, GATv2Conv, TransformerConv (both backends), or one "
                        "backend, as in GATConv/fast or TransformerConv/pyg, no-mixer (default: all)")
    p.add_argument("--graphs", default="full", metavar="SPEC,...",
                   help="context graphs, comma-separated, a per-layer list in brackets, each with every kind of "
                        "--pos or with the one after an @, as in full@abs (default: full)")
    p.add_argument("--pos", default="abs", metavar="abs,rel", help="positions, comma-separated (default: abs)")
    p.add_argument("--iters", type=int, default=10, help="timed training steps per model (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first (default: 3)")
    p.add_argument("--gen_length", type=int, default=500, help="characters per generation (default: 500)")
    p.add_argument("--gen_repeats", type=int, default=3,
                   help="timed generations per model and mode; 0 skips generation (default: 3)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every model for training, and the cached decoder's one-token step")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: autocast the forward passes to bf16 (CUDA only; default: float32)")
    p.add_argument("--profile_steps", type=int, default=0, metavar="N",
                   help="after the timed steps, profile N more of each model with the PyTorch profiler and print "
                        "where their time goes, in self CPU time: matrix products (mm, addmm, bmm), "
                        "scaled_dot_product_attention's kernels and the rest (CPU only; default: 0, no profile)")
    p.add_argument("--json", action="store_true", help="also print one JSON object per result row")
    return p


def main(argv=None):
    return exit_code(run, build_parser().parse_args(argv))


def check_counts(args):
    for key in ("iters", "gen_length", *(f for f in SHAPE_FLAGS if getattr(args, f) is not None)):
        check_count(f"--{key}", getattr(args, key))
    for key in ("warmup", "gen_repeats", "profile_steps"):
        check_count(f"--{key}", getattr(args, key), least=0)


def configurations(args, preset):
    """The settings of each benchmarked (graph, positions), each with the (model, backend) pairs it runs."""
    base = dict(PRESETS[preset]["gpt"], **{f: getattr(args, f) for f in SHAPE_FLAGS if getattr(args, f) is not None})
    check_heads(base)
    models = selected_models(args.models)
    pairs = placement_list(args.graphs, args.pos)
    refuse_placing_without_a_mixer(pairs, args.models, any(name not in GRAPHLESS for name, _ in models))
    configs = []
    for i, (graph, pos) in enumerate(pairs):
        runs = [m for m in models if i == 0 or m[0] not in GRAPHLESS]  # graphless models: once
        graphs = parse_graph(graph, base["n_layer"], "--graphs")
        configs.append(dict(base, graph=graph_spec(graphs), pos=pos, models=runs))
    refuse_twice_placed([(c["graph"], c["pos"]) for c in configs], args.graphs, args.pos)
    bigram = dict(PRESETS[preset]["bigram"], **{f: getattr(args, f) for f in ("block_size", "batch_size")
                                                if getattr(args, f) is not None})
    return configs, bigram


def run(args):
    check_output("the benchmark's tables")
    check_counts(args)
    device = resolve_device(args.device)
    if args.profile_steps and device.type != "cpu":
        raise UsageError(f"--profile_steps measures CPU time, which on {device} is not the step's time; profile "
                         f"with --device cpu")
    check_dtype(args.dtype, device)
    check_compile(args.compile, device)
    preset = resolve_preset(args.preset, device)
    configs, bigram = configurations(args, preset)
    shape = configs[0]
    print(f"preset {preset} (block {shape['block_size']}, batch {shape['batch_size']}, width {shape['n_embd']}, "
          f"{shape['n_head']} heads, {shape['n_layer']} layers), device {device}, {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    common = {"preset": preset, "device": str(device), "block_size": shape["block_size"],
              "batch_size": shape["batch_size"]}

    def compiling():  # --compile whose kernels fail to build ends in one line
        return compile_failures(args.compile, "the benchmark's models", lambda: "benchmark them without --compile")

    with compiling(), fitting(f"the benchmark's training does not fit in the memory of {device}",
                              "lower --batch_size, --block_size or --n_embd, or leave the pyg backends, whose memory "
                              "grows with the square of the block, out of --models"):
        train_rows = bench_training(
            [(name, backend, bigram if name == "bigram" else s) for s in configs for name, backend in s["models"]],
            device, args.dtype, args.compile, args.warmup, args.iters, common, args.profile_steps)
    with compiling(), fitting(f"the benchmark's generation does not fit in the memory of {device}",
                              "lower --gen_length, --block_size or --n_embd, or skip generation with --gen_repeats 0"):
        gen_rows = (bench_generation(configs, device, args.gen_length, args.gen_repeats, common, args.compile)
                    if args.gen_repeats else [])

    print_tables(train_rows, gen_rows, args.gen_length, args.compile)
    if args.json:
        for r in train_rows + gen_rows:
            print(json.dumps(r))


if __name__ == "__main__":
    sys.exit(main())
