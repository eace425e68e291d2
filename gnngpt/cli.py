"""Command-line interface of the training scripts pyg-gpt.py, gpt.py and bigram.py, whose parser pieces and checks
the other scripts (compare.py, bench.py, sample.py, evaluate.py, plot_attention.py, scripts/layer_table.py) use
too."""
import argparse
import contextlib
import functools
import importlib.metadata
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed, sampling
from .config import PRESETS, RUNS_AT_ONCE, SEED, resolve_preset
from .data import DEFAULT_DATA, BatchSampler, CharTokenizer, load_text, split, text_digest
from .errors import (
    TOO_BIG,
    Failure,
    TooBig,
    UsageError,
    check_count,
    fitting,
    flush_output,
    os_error_exit,
    terminated_as_interrupted,
)
from .evaluation import describe_evaluation, exact_evaluation, has_snapshot, write_eval
from .fast_gat import NO_DENSE_FORM, compile_failures, compiled, compiler_available
from .graph import GRAPH_HELP, graph_spec, parse_graph
from .guard import check_layer, check_layer_name, format_layer_table, layer_support
from .lists import list_items, refuse_twice
from .mixers import GAT_LAYERS, parse_layer_kwargs, pyg_nn
from .models import PYG_ASKED, BigramConfig, GPTConfig, build_model
from .rundir import ROOT, check_run_dir, default_run_dir, hold_run_dir, holds_run, run_name, start_run_dir
from .sampling import sample_path, sampling_failure, write_model_output
from .tracking import add_arguments as add_tracking_arguments, import_trackers, open_tracking
from .train import Interrupted, train

DEVICES = ("auto", "cpu", "cuda", "mps")
AUTO_DEVICE_HELP = "auto picks cuda, then mps (Apple silicon), then cpu"
DEVICE_NEEDS = {"cuda": "CUDA is not available",
                "mps": "MPS is not available (it needs Apple silicon and a PyTorch built with MPS)"}
POSITIVE_INTS = ("batch_size", "block_size", "max_iters", "eval_interval", "eval_iters", "n_embd", "n_head", "n_layer")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem, a pointer to --help, exit code 2. A negative number that argparse
    takes for a flag (-1e-3 after the flag as given in full; argparse reads -0.001 as a number) gets the way to pass
    it."""

    def parse_known_args(self, args=None, namespace=None):
        self.given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        flag = re.fullmatch(r"argument (\S+?)(?:/\S+)?: expected one argument", message)
        given = getattr(self, "given", [])
        values = [b for a, b in zip(given, given[1:]) if flag and a == flag[1] and b.startswith("-") and is_number(b)]
        hint = f"; pass a negative number as {flag[1]}={values[-1]}" if values else ""
        self.exit(2, f"{self.prog}: error: {message}{hint} (see --help)\n")


def is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_parser(script):
    """The parser of one training script (a config.Script)."""
    p = ArgumentParser(description=script.description)
    if script.graph_layer:
        p.add_argument("--gat_version", "--gnn", default="GATConv", metavar="NAME",
                       help=f"graph layer that replaces self-attention: {' or '.join(GAT_LAYERS)}, or any "
                            f"convolution of torch_geometric.nn that --list_layers marks as working (default: GATConv)")
        p.add_argument("--gnn_kwargs", default="{}", metavar="JSON",
                       help="extra constructor arguments of the layer as a JSON object, e.g. '{\"K\": 2}' "
                            "(default: {})")
        p.add_argument("--list_layers", action="store_true",
                       help="print every PyG convolution, whether it works as the token mixer and why not, then exit")
    preset_help = "(default: from --preset)"
    p.add_argument("--batch_size", type=int, help=f"sequences per training step {preset_help}")
    p.add_argument("--block_size", type=int, help=f"context length in characters {preset_help}")
    p.add_argument("--max_iters", type=int, help=f"training steps {preset_help}")
    p.add_argument("--eval_interval", type=int, help=f"steps between loss evaluations {preset_help}")
    p.add_argument("--eval_iters", type=int, help=f"batches per split in each evaluation {preset_help}")
    p.add_argument("--learning_rate", type=float, help=f"AdamW learning rate {preset_help}")
    if script.has_model_size:
        p.add_argument("--n_embd", type=int, help=f"embedding width {preset_help}")
        p.add_argument("--n_head", type=int, help=f"attention heads; must divide n_embd {preset_help}")
        p.add_argument("--n_layer", type=int, help=f"blocks {preset_help}")
        p.add_argument("--dropout", type=float, help=f"dropout probability in [0, 1) {preset_help}")
        p.add_argument("--graph", default="full", metavar="SPEC",
                       help=f"which earlier tokens each token receives messages from: {GRAPH_HELP} "
                            f"(default: full, every earlier token, as in the original)")
        p.add_argument("--pos", choices=("abs", "rel"), default="abs",
                       help="abs: learned position embeddings (the original); rel: none, each edge carries the "
                            "distance between its tokens instead (default: abs)")
    p.add_argument("--seed", type=int, default=SEED, help=f"random seed (default: {SEED})")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help=f"where to train; {AUTO_DEVICE_HELP} (default: auto)")
    p.add_argument("--data", default=None, metavar="PATH", type=path_value,
                   help=f"UTF-8 training text (default: {DEFAULT_DATA}, tinyshakespeare, downloaded when missing)")
    p.add_argument("--out_dir", metavar="DIR", type=path_value,
                   help="where config.json, metrics.csv and ckpt.pt go (default: runs/<name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out_dir from its ckpt.pt (pass the flags of the original run; "
                        "--max_iters may grow)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out_dir (without it, an existing run there is refused)")
    p.add_argument("--preset", choices=("auto", "paper", "cpu"), default="auto",
                   help="paper: the published A100 hyperparameters; cpu: a downsized run for a 2-core CPU; "
                        "auto: paper on CUDA, cpu otherwise. Explicit flags override it (default: auto)")
    if script.graph_layer:
        p.add_argument("--backend", choices=("fast", "pyg"), default="fast",
                       help="GATConv, GATv2Conv, TransformerConv: fast (masked dense attention, same parameters) "
                            "or pyg (PyG message passing, the reference); other layers, and configurations the "
                            "fast backend does not cover, use pyg (default: fast)")
    p.add_argument("--exact_at", type=step_list, default=(), metavar="STEP[,STEP...]",
                   help="also score the validation split exactly at these evaluation steps before the last, into "
                        "eval_step<STEP>.json and loss_by_position_step<STEP>.csv (default: the last step only)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model for training (on the CPU it needs a C++ compiler; "
                        "the first steps are slow while it compiles)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: autocast the forward passes to bf16, for CUDA GPUs that support it "
                        "(default: float32)")
    add_tracking_arguments(p)
    return p


def path_value(text):
    """The value of a path flag; an empty one is refused rather than read as the current directory (or, for
    --out_dir, as not given)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty; give a path")
    return text


def graph_list(text):
    """The entries of --graphs: separated by commas, a per-layer list in brackets (see graph.parse_graph), each
    perhaps with @abs or @rel after it."""
    outside = re.sub(r"\[[^\[\]]*\]", "", text)
    if "[" in outside or "]" in outside:
        raise UsageError(f"--graphs {text!r} has an unpaired bracket; write a per-layer list as [window:4,full], "
                         "one graph per layer")
    return list_items(text, "--graphs", "full,window:16", re.split(r",(?![^\[\]]*\])", text))  # commas outside []


def position_list(text):
    """The positions of --pos: abs, rel or both, comma-separated."""
    positions = list_items(text, "--pos", "abs,rel")
    if any(p not in ("abs", "rel") for p in positions):
        raise UsageError(f"--pos {text!r}: give abs, rel or abs,rel")
    refuse_twice(positions, f"--pos {text!r}")
    return positions


def placement_list(graphs, pos):
    """The (graph, positions) pairs of --graphs and --pos: each graph with each kind of positions of --pos, or
    with the one kind it names after an @, as in full@abs,window:8 --pos rel."""
    positions = position_list(pos)
    pairs = []
    for entry in graph_list(graphs):
        spec, at, named = (part.strip() for part in entry.partition("@"))
        if at and named not in ("abs", "rel"):
            raise UsageError(f"--graphs entry {entry!r}: after @ give abs or rel, as in full@abs")
        if spec.startswith("[") and spec.endswith("]"):
            spec = spec[1:-1].strip()
        if not spec:
            raise UsageError(f"--graphs entry {entry!r} names no graph; give one, as in full@abs or [window:4,full]")
        pairs += [(spec, p) for p in ([named] if at else positions)]
    return pairs


def refuse_placing_without_a_mixer(pairs, models, has_mixer):
    """UsageError when the (graph, positions) pairs of --graphs and --pos are other than the original's (the
    complete graph, absolute positions) while no model of --models (the flag's text) has a token mixer."""
    if pairs != [("full", "abs")] and not has_mixer:
        raise UsageError(f"--graphs and --pos place a token mixer, and --models {models} has none; drop them, or add "
                         f"a model such as gpt")


def refuse_twice_placed(placed, graphs, pos):
    """UsageError for a (graph, positions) pair of --graphs and --pos given twice, the graphs in canonical form
    (graph.graph_spec): window:2 and [window:2,window:2] are one graph."""
    refuse_twice(placed, f"--graphs {graphs!r} with --pos {pos!r}", lambda pair: f"{pair[0]} with {pair[1]} positions")


def resolve_device(requested):
    """The torch device of a --device choice; auto is the first available of cuda, mps and cpu."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if requested == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if not available[requested]:
        raise UsageError(f"--device {requested} was requested but {DEVICE_NEEDS[requested]}; "
                         f"use --device cpu or auto")
    return torch.device(requested)


def check_compile(compile, device):
    """Refuse --compile on a CPU without the C++ compiler that torch.compile builds CPU kernels with."""
    if compile and device.type == "cpu" and not compiler_available():
        raise UsageError("--compile on a CPU needs a C++ compiler (g++ or clang++) and none was found; install one "
                         "or drop --compile")


def check_dtype(dtype, device):
    """Refuse --dtype bfloat16 where there is no CUDA GPU with bf16 support. A CUDA device that this machine lacks
    is another's (a SLURM job's, planned by compare.py) and is checked there."""
    here = torch.cuda.is_available()
    if dtype == "bfloat16" and not (device.type == "cuda" and (not here or torch.cuda.is_bf16_supported())):
        raise UsageError("--dtype bfloat16 needs a CUDA GPU with bf16 support; use --dtype float32 here")


def step_list(text):
    """The steps of --exact_at: positive integers, comma-separated."""
    try:
        steps = [int(item) for item in text.split(",")]
    except ValueError:
        steps = [0]
    if min(steps) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive steps")
    if len(set(steps)) < len(steps):
        raise argparse.ArgumentTypeError(f"{text!r} names a step twice; give each once")
    return tuple(sorted(steps))


def resolve_settings(script, args, device, graph_flag="--graph"):
    """Preset values, overridden by every flag given explicitly; checked for sense (the graph as graph_flag's, as
    compare.py passes on each graph of its --graphs)."""
    preset = resolve_preset(args.preset, device)
    settings = dict(PRESETS[preset][script.arch])
    settings.update({k: v for k, v in vars(args).items() if k in settings and v is not None})
    for key in POSITIVE_INTS:
        if key in settings:
            check_count(f"--{key}", settings[key])
    if not (math.isfinite(settings["learning_rate"]) and settings["learning_rate"] > 0):
        raise UsageError(f"--learning_rate must be a positive number, got {settings['learning_rate']}")
    check_seed(args.seed)
    if "dropout" in settings and not 0 <= settings["dropout"] < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {settings['dropout']}")
    if "n_head" in settings:
        check_heads(settings)
    if script.has_model_size:
        settings.update(graph=graph_spec(parse_graph(args.graph, settings["n_layer"], graph_flag)), pos=args.pos)
    check_dtype(args.dtype, device)
    check_compile(args.compile, device)
    for step in args.exact_at:
        if step >= settings["max_iters"] or step % settings["eval_interval"]:
            raise UsageError(f"--exact_at {step} is not an evaluation step before the last (a multiple of "
                             f"--eval_interval {settings['eval_interval']} below --max_iters {settings['max_iters']}); "
                             f"choose such steps")
    settings.update(dtype=args.dtype, compile=args.compile)
    return preset, settings


def check_heads(settings):
    """Refuse settings whose n_head does not divide n_embd."""
    if settings["n_embd"] % settings["n_head"]:
        raise UsageError(f"n_embd {settings['n_embd']} is not divisible by n_head {settings['n_head']}; "
                         f"choose --n_embd as a multiple of --n_head")


def check_seed(seed):
    """Refuse a --seed that torch's generators cannot take (leaving room for a process's rank added to it)."""
    if not 0 <= seed < 2**63:
        raise UsageError(f"--seed must be an integer from 0 to 2**63 - 1, got {seed}")


def main(script, argv=None):
    """Run one training script (a config.Script); bad input (memory too small for its sizes included) ends with a
    one-line error and exit code 2, SIGINT/SIGTERM with 130/143."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        try:
            with fitting(TOO_BIG, train_smaller(script), TooBig):
                run(script, build_parser(script).parse_args(argv))
            flush_output()
        except UsageError as e:
            if distributed.is_main_process() or isinstance(e, TooBig):
                print(f"error: {e}", file=sys.stderr)
            return 2
        except Failure as e:  # raised on rank 0 alone, after training
            print(f"error: {e}", file=sys.stderr)
            return 1
        except Interrupted as e:
            if distributed.is_main_process():
                print(f"{e}; resume with: {resume_command(script, argv)}", file=sys.stderr)
            return e.exit_code
        except OSError as e:
            return os_error_exit(e)
        finally:
            distributed.teardown()
    except KeyboardInterrupt as e:  # or Terminated; also a second Ctrl-C while the first stop is reported
        print("interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    return 0


def train_smaller(script, out_dir=None):
    """How to go on when the model and batch do not fit in memory: train with smaller sizes, and with --overwrite
    where out_dir holds what the run wrote (a training that fails before its first checkpoint leaves nothing; under
    torchrun, a rank other than 0 may look before rank 0 has removed it, and name --overwrite, which does no harm)."""
    sizes = "--batch_size, --block_size, --n_embd or --n_layer" if script.has_model_size else \
        "--batch_size or --block_size"
    overwrite = " and --overwrite" if out_dir is not None and holds_run(out_dir) else ""
    return f"train again with a lower {sizes}{overwrite}"


def resume_command(script, argv):
    """The command line that continues this run."""
    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    launcher = "torchrun <the same torchrun options>" if distributed.launched_by_torchrun() else "python"
    return f"{launcher} {shlex.join([script.filename, *args, '--resume'])}"


def run(script, args):
    if script.graph_layer and args.list_layers:
        print(format_layer_table(layer_support()))
        return
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: --resume continues the run in --out_dir, "
                         "--overwrite replaces it; pass one of them")
    import_trackers(args)  # a tracker whose package is missing ends here, before anything is written
    model_name = script.model_name(args)
    if script.graph_layer:
        check_layer_name(model_name)
    mixer_kwargs = parse_layer_kwargs(args.gnn_kwargs) if script.graph_layer else {}
    device = distributed.setup(resolve_device(args.device))  # under torchrun: join the process group
    preset, settings = resolve_settings(script, args, device)
    name = run_name(model_name, settings)
    print(f"{name}: preset {preset}, device {device}")

    text = load_text(args.data)
    tokenizer = CharTokenizer.from_text(text)
    train_data, val_data = split(torch.tensor(tokenizer.encode(text), dtype=torch.long))
    seed = args.seed + distributed.rank()  # each rank draws its own batches and dropout masks
    sampler = BatchSampler(train_data, val_data, settings["block_size"], settings["batch_size"], device, seed)

    torch.manual_seed(seed)
    model_cfg = model_config(script, model_name, args, settings, tokenizer.vocab_size, mixer_kwargs)
    model = build_model(script.arch, asdict(model_cfg)).to(device)
    if settings["compile"]:
        compiled(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters ({n_params:,})")
    if script.graph_layer:
        print(f"backend: {backend_description(model.blocks[0].mixer)}")
    if script.has_model_size:
        print(f"graph: {settings['graph']}, positions: {settings['pos']}")

    out_dir = Path(args.out_dir or default_run_dir(name))
    config = {
        "name": name,
        "arch": script.arch,
        "model_config": asdict(model_cfg),
        "settings": settings,
        "seed": args.seed,
        "preset": preset,
        "device": str(device),
        "machine": machine_description(device),
        "data": str(args.data or DEFAULT_DATA),
        "data_sha256": text_digest(text),
        "parameters": n_params,
        "processes": distributed.world_size(),
        "torch_threads": torch.get_num_threads(),
        "runs_at_once": runs_at_once(),
        "versions": versions(),
        "code": [version] if (version := code_version()) else [],  # its commits; a resume under others adds them
    }
    # no other process writes or reads out_dir until the sample is written
    with fitting(TOO_BIG, lambda: train_smaller(script, out_dir), TooBig), hold_run_dir(out_dir, args.resume):
        resume_from = check_run_dir(out_dir, config, tokenizer.chars, args.resume, args.overwrite)
        if resume_from:
            check_snapshot_steps(args.exact_at, resume_from["step"], out_dir)
            # the most that shared the machine with any part of the run
            config["runs_at_once"] = max(config["runs_at_once"], resume_from["config"].get("runs_at_once", 1))
            config["code"] = list(dict.fromkeys(resume_from["config"].get("code", []) + config["code"]))
        wandb_run_id = resume_from.get("wandb_run_id") if resume_from else None
        # the trackers start before config.json is written: a failed wandb.init leaves no run behind
        with open_tracking(args, name, out_dir, config, wandb_run_id) as tracking:
            start_run_dir(out_dir, config, args.overwrite)  # writes config.json
            meta = {"name": name, "arch": script.arch, "model_config": asdict(model_cfg), "config": config,
                    "vocab": tokenizer.chars, "wandb_run_id": tracking.wandb_run_id or wandb_run_id}
            go_on = functools.partial(go_on_without_compiling, out_dir / "ckpt.pt")
            with compile_failures(settings["compile"], "the model", go_on), resumable_on_stop(out_dir / "ckpt.pt"):
                train(model, sampler, settings, out_dir, meta, resume_from=resume_from, tracking=tracking,
                      after_evaluation=functools.partial(snapshot, args.exact_at, model, val_data, settings, out_dir))
                if not distributed.is_main_process():
                    return
                with fitting("the exact evaluation after the last step does not fit in memory",
                             f"the trained model is saved in {out_dir / 'ckpt.pt'}; finish the run with --resume",
                             Failure):
                    result = exact_evaluation(model, val_data, settings, device)
                try:
                    write_eval(out_dir, result, settings["max_iters"])
                except UsageError as e:
                    raise UsageError(f"{e}, then finish the run with --resume") from None
                print(f"{describe_evaluation(result)}; in {result['eval_s']:.1f} s")
                sample_file = sample_path(out_dir)
                sample = write_sample(model.eval(), tokenizer, sample_file, device, out_dir)
            tracking.attach(out_dir / "ckpt.pt", sample_file)
    print(sample)
    print(f"wrote {out_dir}/config.json, metrics.csv, ckpt.pt, eval.json, loss_by_position.csv and {sample_file}")


def go_on_without_compiling(checkpoint_path):
    """How a run whose compiling failed goes on: from checkpoint_path where it was written, else from the start (the
    failed run leaves no file then, see rundir.hold_run_dir)."""
    return f"train it without --compile{', with --resume' if checkpoint_path.is_file() else ''}"


@contextlib.contextmanager
def resumable_on_stop(checkpoint_path):
    """Turn a stop where training does not catch it (a second Ctrl-C or SIGTERM in training; one in the exact
    evaluation or the sampling after the last step) into Interrupted once checkpoint_path exists: --resume goes
    on from it, and finishes a run stopped after its last step. SIGTERM raises Terminated meanwhile, where no
    handler of it was set (errors.terminated_as_interrupted)."""
    try:
        with terminated_as_interrupted():
            yield
    except KeyboardInterrupt as e:
        if not checkpoint_path.is_file():
            raise
        raise Interrupted(getattr(e, "signum", signal.SIGINT),
                          f"before the run finished; its last checkpoint is {checkpoint_path}") from None


def snapshot(steps, model, val_data, settings, out_dir, step):
    """At each of steps (--exact_at), the exact evaluation of the validation split, written by rank 0 as that step's
    snapshot (evaluation.write_eval), unless the run has it already (a resumed run calls this again for the step
    it resumes from, whose snapshot a stop may have cut short)."""
    if step not in steps or distributed.from_main(lambda: has_snapshot(out_dir, step)):
        return
    if distributed.is_main_process():
        result = exact_evaluation(model, val_data, settings, next(model.parameters()).device)
        write_eval(out_dir, result, step, at=step)
        tqdm.write(f"step {step}: {describe_evaluation(result)}; in {result['eval_s']:.1f} s")
    distributed.barrier()


def check_snapshot_steps(steps, resumed_step, out_dir):
    """Refuse an --exact_at step before the step a run resumes from where the run has no snapshot: the weights of
    that step are gone."""
    lost = [step for step in steps if step < resumed_step and not has_snapshot(out_dir, step)]
    if lost:
        raise UsageError(f"--exact_at {lost[0]} is before step {resumed_step}, where the run in {out_dir} resumes, "
                         f"and the run has no snapshot of it: its weights at step {lost[0]} are gone; choose steps "
                         f"from {resumed_step} on, or train the run again with --overwrite")


def write_sample(model, tokenizer, path, device, out_dir):
    """write_model_output after training, whose checkpoint and metrics are on disk by then; where it raises, a
    Failure that says the model is saved and gives the sample.py command that samples from it (with --no_cache
    where the cached decoder raised)."""
    try:
        return write_model_output(model, tokenizer, path, device)
    except Exception as e:  # whatever sampling or writing raised: the trained model is kept either way
        error, decoder_raised = sampling_failure(e)
        retry = ["python", "sample.py", "--out_dir", str(out_dir), "--device", device.type, "--num_samples", "1",
                 "--max_new_tokens", str(sampling.SAMPLE_LENGTH), "--temperature", "1", "--top_k", "0",
                 *(["--no_cache"] if decoder_raised else [])]
        raise Failure(f"writing the sample failed ({error}); the trained model is saved in {out_dir / 'ckpt.pt'}; "
                      f"sample from it with: {shlex.join(retry)}") from None


def model_config(script, name, args, settings, vocab_size, mixer_kwargs):
    """The config of the script's model; for a graph layer, checked by the causality guard first."""
    if not script.has_model_size:
        return BigramConfig(vocab_size=vocab_size)
    if not script.graph_layer:
        return GPTConfig.from_settings(settings, vocab_size, mixer="attention")
    return layer_config(name, args.backend, mixer_kwargs, settings, vocab_size)


def layer_config(name, backend, mixer_kwargs, settings, vocab_size):
    """The config of a model of the graph layer name, checked first by the causality guard, which refuses a layer
    that cannot be built or sees the future."""
    cfg = GPTConfig.from_settings(settings, vocab_size, mixer=name, backend=backend, mixer_kwargs=mixer_kwargs)
    check_layer(cfg)
    return cfg


def backend_description(mixer):
    """How a graph layer computes: "fast (masked dense attention)", or "pyg (message passing)" with the reason
    where the fast backend was asked for a layer it computes in other configurations."""
    if mixer.dense:
        return "fast (masked dense attention)"
    fell_back = mixer.dense_refusal not in (NO_DENSE_FORM, PYG_ASKED)
    return f"pyg (message passing{': the fast backend does not cover ' + mixer.dense_refusal if fell_back else ''})"


def runs_at_once():
    """How many trainings share the machine, as compare.py --jobs tells its children through RUNS_AT_ONCE (1 unset)."""
    value = os.environ.get(RUNS_AT_ONCE, "1")
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise UsageError(f"{RUNS_AT_ONCE} must be a positive integer (how many trainings share the machine), got "
                         f"{value!r}; unset it to train alone")
    return int(value)


def machine_description(device):
    """The accelerator's name, or the CPU as the README names it (cores, architecture) and the threads torch
    trained with on it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple {platform.machine()} GPU (MPS)"
    threads = torch.get_num_threads()
    return f"{os.cpu_count()}-core {platform.machine()} CPU, {threads} torch thread{'s' if threads > 1 else ''}"


def versions():
    """The versions a run trained with."""
    return {"python": platform.python_version(), "torch": str(torch.__version__), "torch_geometric": pyg_version()}


def code_version():
    """The git commit of the repository's code, with "+modified" where its tracked files differ from it; None
    without git or outside a git checkout (a copy of the files alone)."""
    try:
        commit, changes = (subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True,
                                          timeout=60).stdout.strip()
                           for args in (["rev-parse", "HEAD"], ["status", "--porcelain", "--untracked-files=no"]))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+modified" if changes else "")


def pyg_version():
    """PyG's version: the imported module's where a PyG layer was built; else read from the installed package's
    metadata, without importing PyG (seconds) for a run that builds no PyG layer; else, for a copy without its
    metadata (one on PYTHONPATH), imported after all."""
    if "torch_geometric" not in sys.modules:
        try:
            return importlib.metadata.version("torch_geometric")
        except importlib.metadata.PackageNotFoundError:
            pyg_nn()
    return sys.modules["torch_geometric"].__version__
