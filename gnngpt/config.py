"""Hyperparameter presets: the published run and a CPU-sized one."""

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


def resolve_preset(preset, device):
    """The preset that "auto" stands for on device: paper on CUDA, cpu otherwise."""
    if preset != "auto":
        return preset
    return "paper" if device.type == "cuda" else "cpu"
