"""Finished runs read back: trained models and summary tables."""
import json
import statistics
from pathlib import Path

from .checkpoint import load_checkpoint
from .config import PRESETS, PUBLISHED_VAL_LOSS
from .data import CharTokenizer
from .errors import UsageError
from .graph import parse_graph
from .models import model_from_checkpoint
from .rundir import file_in_the_way, read_metrics, refuse_if_held

# the settings every preset trains with unless told: eager float32 on the original's graph and positions
PRESET_DEFAULTS = {"dtype": "float32", "compile": False, "graph": "full", "pos": "abs"}


def load_run_model(out_dir, device="cpu", backend=None):
    """The model of out_dir/ckpt.pt in eval mode on device, its tokenizer and the checkpoint's name.

    backend ("fast" or "pyg") replaces the run's own for a graph layer: both hold the same parameters. A run that
    a training holds (see rundir.hold_run_dir) is refused.
    """
    if refusal := file_in_the_way(out_dir, "--out_dir"):
        raise UsageError(refusal)
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
    settings = config["settings"]
    rows = read_metrics(out_dir)
    best = min(rows, key=lambda r: r["val_loss"])
    rates = [r["tokens_per_s"] for r in rows if r["tokens_per_s"]]
    return {
        "name": config["name"],
        "out_dir": Path(out_dir),
        "model": trained_model(config),
        "graph": settings.get("graph"),
        "pos": settings.get("pos"),
        "edges_per_token": edges_per_token(settings),
        "arch": config["arch"],
        "settings": settings,
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


def trained_model(config):
    """The model a run's config describes: its PyG layer, gpt or bigram."""
    mixer = config["model_config"].get("mixer")
    return config["arch"] if mixer is None else "gpt" if mixer == "attention" else mixer


def edges_per_token(settings):
    """The mean in-degree of a full block under a run's graphs, averaged over layers (None for the bigram)."""
    if "graph" not in settings:
        return None
    graphs = parse_graph(settings["graph"], settings["n_layer"])
    return statistics.mean(g.edges_per_token(settings["block_size"]) for g in graphs)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


def published_val_loss(summary):
    """The original's validation loss for a run of the paper preset of one of its four models, else None."""
    return PUBLISHED_VAL_LOSS.get(summary["name"]) if summary["preset"] == "paper" else None


def results_table(summaries):
    """A markdown table with one row per run: losses, parameters, speed, time, preset, device and machine.

    When a run has a published value (see published_val_loss), a "published" column follows the final loss.
    """
    published = [published_val_loss(s) for s in summaries]
    with_published = any(value is not None for value in published)
    header = ["model", "final val loss", *(["published"] if with_published else []), "best val loss (step)",
              "parameters", "tokens/s", "wall time", "preset", "device", "machine"]
    rows = []
    for s, value in zip(summaries, published):
        row = [s["name"], f"{s['final_val_loss']:.4f}"]
        if with_published:
            row.append("-" if value is None else f"{value:.2f}")
        rows.append(row + [f"{s['best_val_loss']:.4f} ({s['best_step']})", f"{s['parameters']:,}",
                           format_rate(s["tokens_per_s"]), format_duration(s["wall_s"]), s["preset"], s["device"],
                           s["machine"]])
    return markdown_table(header, rows)


def setting_notes(summaries):
    """"- KEY VALUE instead of PRESET_VALUE (models)" for each setting in which runs differ from their preset."""
    differences = {}  # key -> (value, preset value) -> names
    for s in summaries:
        preset = {**PRESET_DEFAULTS, **PRESETS[s["preset"]][s["arch"]]}
        for key, value in s["settings"].items():
            if value != preset.get(key):
                differences.setdefault(key, {}).setdefault((value, preset.get(key)), []).append(s["name"])
    every_model = [s["name"] for s in summaries]
    return [f"- {key} {value} instead of {preset_value} "
            f"({'all models' if names == every_model else ', '.join(names)})"
            for key, variants in differences.items() for (value, preset_value), names in variants.items()]


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


def graph_study_table(summaries):
    """A markdown table of runs on context graphs: edges per token, final validation loss and speed."""
    ranked = sorted(summaries, key=lambda s: (s["model"], s["edges_per_token"] or 0, s["pos"] or ""))
    header = ["model", "graph", "positions", "edges per token", "final val loss", "best val loss (step)",
              "tokens/s", "parameters"]
    return markdown_table(header, [
        [s["model"], s["graph"] or "-", s["pos"] or "-",
         "-" if s["edges_per_token"] is None else f"{s['edges_per_token']:.1f}", f"{s['final_val_loss']:.4f}",
         f"{s['best_val_loss']:.4f} ({s['best_step']})", format_rate(s["tokens_per_s"]), f"{s['parameters']:,}"]
        for s in ranked
    ])
