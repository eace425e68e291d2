"""Draw each layer's and head's attention over a prompt as heatmaps.

    python plot_attention.py --out_dir runs/GATv2Conv --prompt "ROMEO:"
"""
import json
import sys
from pathlib import Path

from gnngpt.errors import UsageError, exit_code, quiet_interrupt

with quiet_interrupt(__name__ == "__main__"):  # importing torch takes seconds: Ctrl-C then ends in one line
    from gnngpt import rundir
    from gnngpt.attention import attention_maps, rank_agreement
    from gnngpt.cli import DEVICES, ArgumentParser, path_value, resolve_device
    from gnngpt.data import encode_prompt, read_prompt
    from gnngpt.plots import ATTENTION_FIGURE, DRAWN_FROM, plot_attention, png_texts
    from gnngpt.results import load_run_model

DEFAULT_PROMPT = "ROMEO:\nBut soft! what light"


def build_parser():
    p = ArgumentParser(description="Draw the attention of a trained gpt.py or pyg-gpt.py model over a prompt.")
    p.add_argument("--out_dir", default="runs/GATConv", metavar="DIR", type=path_value,
                   help="run directory holding ckpt.pt (default: runs/GATConv)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help=f"text to draw the attention over, or FILE:path (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--out", metavar="PNG", type=path_value,
                   help="where the figure goes (default: attention.png in --out_dir, beside the checkpoint)")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where to run the model (default: cpu)")
    return p


def main(argv=None):
    """Write the heatmaps; bad input ends with a one-line error and exit code 2."""
    return exit_code(run, build_parser().parse_args(argv))


def check_out(out, given):
    """Refuse a path the figure cannot go to, or must not: a name without .png (the figure is a PNG), and, given
    as --out, an existing file other than an attention figure of this script (a run's file, or a figure the
    repository ships). Its default path, attention.png in the run directory, is its own, unless it links to
    another file."""
    name = f"--out {out}" if given else str(out)
    if out.is_dir():
        raise UsageError(f"{name} is a directory; give --out a file name, such as {out / 'attention.png'}")
    if out.exists() and not out.is_file():
        raise UsageError(f"{name} is not a regular file (a device or a pipe); give --out a file name")
    if out.suffix.lower() != ".png":
        raise UsageError(f"{name}: the figure is a PNG; give a file name ending in .png")
    if (given or out.is_symlink()) and out.exists() and png_texts(out).get("Description") != ATTENTION_FIGURE:
        raise UsageError(f"{name} exists and is not an attention figure of plot_attention.py; choose another "
                         f"--out, or remove that file first")


def check_shipped(out, name, source):
    """Refuse to replace a figure in the repository's plots/ (not in its folders, such as runs) but the one of the
    model named name, attention_<name>.png, and that one but as it was made: from the run and prompt it records
    (see figure_source)."""
    own = f"attention_{name}.png"
    if not (out.exists() and out.resolve().parent == rundir.SHIPPED_REPORTS.resolve()):
        return
    if out.resolve().name != own:
        raise UsageError(f"{out} is a figure in the repository's plots/, where it keeps the figures it ships, and a "
                         f"{name} model draws only plots/{own} there; choose another --out")
    differences = source_differences(recorded_source(out), source)
    if differences:
        raise UsageError(f"{out} is the figure the repository ships, and it was drawn from another run or prompt "
                         f"({'; '.join(differences)}); draw it from that run and prompt (docs/sampling.md), or "
                         f"choose another --out")


def figure_source(checkpoint, prompt):
    """What an attention figure is drawn from, recorded in its PNG: the run (its name, seed, model and training
    settings and the SHA-256 of its text, from the config its training saved), the checkpoint's step, and the
    prompt's text."""
    config = checkpoint["config"]
    return {**{key: config.get(key) for key in ("name", "seed", "model_config", "settings", "data_sha256")},
            "step": checkpoint["step"], "prompt": prompt}


def recorded_source(path):
    """The figure_source recorded in the PNG at path; None where it records none."""
    try:
        source = json.loads(png_texts(path).get(DRAWN_FROM, "null"))
    except ValueError:
        return None
    return source if isinstance(source, dict) else None


def source_differences(recorded, source):
    """'key was X, now Y' for each difference between the recorded figure_source and source: the settings that
    make another model (rundir.config_differences), the text, the step and the prompt."""
    if recorded is None:
        return ["the figure records no run"]
    return rundir.config_differences(recorded, source) + [
        f"{key} was {recorded.get(key)!r}, now {source[key]!r}" for key in ("data_sha256", "step", "prompt")
        if recorded.get(key) != source[key]]


def run(args):
    out = Path(args.out or Path(args.out_dir) / "attention.png")
    check_out(out, given=args.out is not None)
    device = resolve_device(args.device)
    model, tokenizer, checkpoint = load_run_model(args.out_dir, device)
    name = checkpoint["name"]
    text = read_prompt(args.prompt)
    source = figure_source(checkpoint, text)
    check_shipped(out, name, source)
    idx = encode_prompt(tokenizer, text, device)  # (1, T)
    maps = [m[0] for m in attention_maps(model, idx)]  # n_layer x (H, T, T)
    agreement = [rank_agreement(m, graph.mask(m.size(-1), m.device)).tolist() for m, graph in zip(maps, model.graphs)]
    try:
        plot_attention(maps, list(text), out,
                       f"{name}: attention of each query token over earlier tokens (rank agreement 1 = static)",
                       agreement, source)
    except OSError as e:
        raise UsageError(f"cannot write --out {out} ({e.strerror or e}); choose another --out") from None
    print(f"wrote {out}")
    print("rank agreement per layer (heads): " + "; ".join(" ".join(f"{a:.2f}" for a in layer) for layer in agreement))


if __name__ == "__main__":
    sys.exit(main())
