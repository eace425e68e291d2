"""Command-line interface shared by pyg-gpt.py, gpt.py and bigram.py."""
import argparse
import json
import math
import platform
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .config import PRESETS, SEED
from .data import DEFAULT_DATA, BatchSampler, CharTokenizer, load_text, split
from .errors import UsageError
from .layers import GAT_LAYERS, check_layer_name
from .models import BigramConfig, GPTConfig, build_model
from .sampling import generate
from .train import train

SAMPLE_LENGTH = 500
POSITIVE_INTS = ("batch_size", "block_size", "max_iters", "eval_interval", "eval_iters", "n_embd", "n_head", "n_layer")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem, a pointer to --help, exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(kind):
    """The parser of one script; kind is "graph", "gpt" or "bigram"."""
    descriptions = {
        "graph": "Train a character-level GPT whose self-attention is a PyTorch Geometric graph layer.",
        "gpt": "Train the character-level transformer baseline.",
        "bigram": "Train the bigram baseline.",
    }
    p = ArgumentParser(description=descriptions[kind])
    if kind == "graph":
        p.add_argument("--gat_version", default="GATConv", metavar="NAME",
                       help=f"graph layer that replaces self-attention: {' or '.join(GAT_LAYERS)} (default: GATConv)")
    preset_help = "(default: from --preset)"
    p.add_argument("--batch_size", type=int, help=f"sequences per training step {preset_help}")
    p.add_argument("--block_size", type=int, help=f"context length in characters {preset_help}")
    p.add_argument("--max_iters", type=int, help=f"training steps {preset_help}")
    p.add_argument("--eval_interval", type=int, help=f"steps between loss evaluations {preset_help}")
    p.add_argument("--eval_iters", type=int, help=f"batches per split in each evaluation {preset_help}")
    p.add_argument("--learning_rate", type=float, help=f"AdamW learning rate {preset_help}")
    if kind != "bigram":
        p.add_argument("--n_embd", type=int, help=f"embedding width {preset_help}")
        p.add_argument("--n_head", type=int, help=f"attention heads; must divide n_embd {preset_help}")
        p.add_argument("--n_layer", type=int, help=f"blocks {preset_help}")
        p.add_argument("--dropout", type=float, help=f"dropout probability in [0, 1) {preset_help}")
    p.add_argument("--seed", type=int, default=SEED, help=f"random seed (default: {SEED})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train; auto picks cuda when available (default: auto)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help=f"UTF-8 training text (default: {DEFAULT_DATA}, tinyshakespeare, downloaded when missing)")
    p.add_argument("--out_dir", metavar="DIR",
                   help="where config.json, metrics.csv and ckpt.pt go (default: runs/<name>)")
    p.add_argument("--preset", choices=("auto", "paper", "cpu"), default="auto",
                   help="paper: the published A100 hyperparameters; cpu: a downsized run for a 2-core CPU; "
                        "auto: paper on CUDA, cpu otherwise. Explicit flags override it (default: auto)")
    return p


def resolve_device(requested):
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but CUDA is not available; use --device cpu or auto")
    return torch.device(requested)


def resolve_settings(kind, args, device):
    """Preset values, overridden by every flag given explicitly; checked for sense."""
    preset = args.preset if args.preset != "auto" else ("paper" if device.type == "cuda" else "cpu")
    settings = dict(PRESETS[preset]["bigram" if kind == "bigram" else "gpt"])
    settings.update({k: v for k, v in vars(args).items() if k in settings and v is not None})
    for key in POSITIVE_INTS:
        if key in settings and settings[key] <= 0:
            raise UsageError(f"--{key} must be a positive integer, got {settings[key]}")
    if not (math.isfinite(settings["learning_rate"]) and settings["learning_rate"] > 0):
        raise UsageError(f"--learning_rate must be a positive number, got {settings['learning_rate']}")
    if "dropout" in settings and not 0 <= settings["dropout"] < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {settings['dropout']}")
    if "n_head" in settings and settings["n_embd"] % settings["n_head"]:
        raise UsageError(
            f"n_embd {settings['n_embd']} is not divisible by n_head {settings['n_head']}; "
            f"choose --n_embd as a multiple of --n_head"
        )
    return preset, settings


def main(kind, argv=None):
    """Run one script; bad input ends with a one-line error and exit code 2."""
    try:
        run(kind, build_parser(kind).parse_args(argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def run(kind, args):
    name = {"graph": getattr(args, "gat_version", None), "gpt": "gpt", "bigram": "bigram"}[kind]
    if kind == "graph":
        check_layer_name(name)
    device = resolve_device(args.device)
    preset, settings = resolve_settings(kind, args, device)
    print(f"{name}: preset {preset}, device {device}")

    text = load_text(args.data)
    tokenizer = CharTokenizer.from_text(text)
    train_data, val_data = split(torch.tensor(tokenizer.encode(text), dtype=torch.long))
    sampler = BatchSampler(train_data, val_data, settings["block_size"], settings["batch_size"], device, args.seed)

    torch.manual_seed(args.seed)
    if kind == "bigram":
        model_cfg = BigramConfig(vocab_size=tokenizer.vocab_size)
    else:
        model_cfg = GPTConfig(
            vocab_size=tokenizer.vocab_size, block_size=settings["block_size"], n_embd=settings["n_embd"],
            n_head=settings["n_head"], n_layer=settings["n_layer"], dropout=settings["dropout"],
            mixer="attention" if kind == "gpt" else name,
        )
    arch = "bigram" if kind == "bigram" else "gpt"
    model = build_model(arch, asdict(model_cfg)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters ({n_params:,})")

    out_dir = Path(args.out_dir or Path("runs") / name)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "name": name,
        "arch": arch,
        "model_config": asdict(model_cfg),
        "settings": settings,
        "seed": args.seed,
        "preset": preset,
        "device": str(device),
        "machine": machine_description(device),
        "data": str(args.data or DEFAULT_DATA),
        "parameters": n_params,
        "versions": versions(),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    meta = {"name": name, "arch": arch, "model_config": asdict(model_cfg), "config": config,
            "vocab": tokenizer.chars}
    train(model, sampler, settings, out_dir, meta)

    model.eval()
    context = torch.zeros((1, 1), dtype=torch.long, device=device)
    sample = tokenizer.decode(generate(model, context, SAMPLE_LENGTH)[0].tolist())
    print(sample)
    sample_path = Path("model_outputs") / f"{name}.txt"
    sample_path.parent.mkdir(exist_ok=True)
    sample_path.write_text(sample)
    print(f"wrote {out_dir}/config.json, metrics.csv, ckpt.pt and {sample_path}")


def machine_description(device):
    """The accelerator's name, or the CPU architecture and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads"


def versions():
    import torch_geometric

    return {"python": platform.python_version(), "torch": str(torch.__version__), "torch_geometric": torch_geometric.__version__}
