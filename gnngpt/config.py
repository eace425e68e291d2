"""The three training scripts, and their hyperparameter presets: the published run and a CPU-sized one."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Script:
    """One training script: its file, the architecture it trains, and whether a PyG layer is its token mixer."""

    filename: str
    arch: str  # "gpt" or "bigram": the model class (see models.ARCHITECTURES) and its preset
    graph_layer: bool  # takes --gat_version: the token mixer is a PyG convolution, which names the model
    description: str

    def model_name(self, args):
        """The name of the model its parsed arguments train: the PyG layer, "gpt" or "bigram"."""
        if self.graph_layer:
            return args.gat_version
        return self.arch

    @property
    def has_model_size(self):
        """Whether the model has a width, heads, layers and dropout (the bigram has none)."""
        return self.arch == "gpt"


PYG_GPT = Script("pyg-gpt.py", "gpt", True,
                 "Train a character-level GPT whose self-attention is a PyTorch Geometric graph layer.")
GPT = Script("gpt.py", "gpt", False, "Train the character-level transformer baseline.")
BIGRAM = Script("bigram.py", "bigram", False, "Train the bigram baseline.")
SCRIPTS = (PYG_GPT, GPT, BIGRAM)


def script_for(model_name):
    """The script that trains the model called model_name: bigram, gpt, or a PyG layer's name."""
    return {"bigram": BIGRAM, "gpt": GPT}.get(model_name, PYG_GPT)


# Settings of the published run (an A100) and of a downsized run that trains on a 2-core CPU in minutes.
PRESETS = {
    "paper": {
        "gpt": dict(batch_size=64, block_size=128, max_iters=5000, eval_interval=50, eval_iters=200,
                    learning_rate=3e-4, n_embd=384, n_head=6, n_layer=6, dropout=0.2),
        "bigram": dict(batch_size=32, block_size=128, max_iters=5001, eval_interval=50, eval_iters=200,
                       learning_rate=1e-2),
    },
    "cpu": {
        "gpt": dict(batch_size=12, block_size=64, max_iters=2000, eval_interval=100, eval_iters=50,
                    learning_rate=1e-3, n_embd=128, n_head=4, n_layer=4, dropout=0.0),
        "bigram": dict(batch_size=32, block_size=64, max_iters=2000, eval_interval=100, eval_iters=50,
                       learning_rate=1e-2),
    },
}
SEED = 1337
# set by compare.py --jobs N for its child trainings: how many run at once (their config.json records it)
RUNS_AT_ONCE = "GNNGPT_RUNS_AT_ONCE"
# The original's validation loss after 5000 steps of the paper preset (an A100), read from its plot.
PUBLISHED_VAL_LOSS = {"bigram": 2.47, "gpt": 1.50, "GATConv": 1.65, "GATv2Conv": 1.57}
PUBLISHED_STEP = 5000


def resolve_preset(preset, device):
    """The preset that "auto" stands for on device: paper on CUDA, cpu otherwise."""
    if preset != "auto":
        return preset
    return "paper" if device.type == "cuda" else "cpu"
