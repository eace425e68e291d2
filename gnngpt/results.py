"""Finished runs read back: trained models and summary tables."""
import json
import statistics
from pathlib import Path

from .checkpoint import load_checkpoint
from .data import CharTokenizer
from .errors import UsageError
from .models import model_from_checkpoint
from .rundir import read_metrics, refuse_if_held


def load_run_model(out_dir, device="cpu", backend=None):
    """The model of out_dir/ckpt.pt in eval mode on device, its tokenizer and the checkpoint's name.

    backend ("fast" or "pyg") replaces the run's own for a graph layer: both hold the same parameters. A run that
    a training holds (see rundir.hold_run_dir) is refused.
    """
    refuse_if_held(out_dir, "try again once that training has ended")
    checkpoint = load_checkpoint(Path(out_dir) / "ckpt.pt")
    overrides = {}
    if backend is not None:
        if checkpoint["model_config"].get("mixer", "attention") == "attention":
            raise UsageError(f"--backend applies to graph-layer runs, and {out_dir} holds a {checkpoint['name']} "
                             "model; drop --backend")
        overrides["backend"] = backend
    model = model_from_checkpoint(checkpoint, device, **overrides)
    return model, CharTokenizer(checkpoint["vocab"]), checkpoint["name"]


def run_summary(out_dir):
    """What a finished run measured: its validation curve, final and best loss, size, speed and machine."""
    config = json.loads((Path(out_dir) / "config.json").read_text())
    rows = read_metrics(out_dir)
    best = min(rows, key=lambda r: r["val_loss"])
    rates = [r["tokens_per_s"] for r in rows if r["tokens_per_s"]]
    return {
        "name": config["name"],
        "steps": [int(r["step"]) for r in rows],
        "val_loss": [r["val_loss"] for r in rows],
        "final_val_loss": rows[-1]["val_loss"],
        "best_val_loss": best["val_loss"],
        "best_step": int(best["step"]),
        "parameters": config["parameters"],
        "tokens_per_s": statistics.median(rates) if rates else None,
        "wall_s": rows[-1]["elapsed_s"],
        "preset": config["preset"],
        "device": config["device"],
        "machine": config["machine"],
    }


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


def results_table(summaries):
    """A markdown table with one row per run: losses, parameters, speed, time, preset, device and machine."""
    header = ["model", "final val loss", "best val loss (step)", "parameters", "tokens/s", "wall time",
              "preset", "device", "machine"]
    return markdown_table(header, [
        [s["name"], f"{s['final_val_loss']:.4f}", f"{s['best_val_loss']:.4f} ({s['best_step']})",
         f"{s['parameters']:,}", format_rate(s["tokens_per_s"]), format_duration(s["wall_s"]), s["preset"],
         s["device"], s["machine"]]
        for s in summaries
    ])


def leaderboard_table(summaries):
    """A markdown table of runs ranked by final validation loss, with their training speed."""
    ranked = sorted(summaries, key=lambda s: s["final_val_loss"])
    return markdown_table(["rank", "model", "final val loss", "tokens/s", "parameters"], [
        [rank, s["name"], f"{s['final_val_loss']:.4f}", format_rate(s["tokens_per_s"]), f"{s['parameters']:,}"]
        for rank, s in enumerate(ranked, 1)
    ])


def format_rate(tokens_per_s):
    return "n/a" if tokens_per_s is None else f"{tokens_per_s:,.0f}"


def format_duration(seconds):
    if seconds < 60:
        return f"{seconds:.1f}s"
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"
