"""Sample text from a trained checkpoint, in the conventions of nanoGPT's sample.py.

    python sample.py --out_dir runs/GATv2Conv --prompt "ROMEO:" --num_samples 3 --max_new_tokens 500
"""
import math
import sys

from gnngpt.errors import (
    Failure,
    UsageError,
    check_count,
    check_output,
    exit_code,
    memory_error,
    out_of_memory,
    quiet_interrupt,
)

with quiet_interrupt(__name__ == "__main__"):  # importing torch takes seconds: Ctrl-C then ends in one line
    import torch

    from gnngpt.cli import (
        AUTO_DEVICE_HELP,
        DEVICES,
        ArgumentParser,
        check_compile,
        check_seed,
        path_value,
        resolve_device,
    )
    from gnngpt.data import encode_prompt, read_prompt
    from gnngpt.fast_gat import compile_failure
    from gnngpt.models import dense_refusal
    from gnngpt.results import load_run_model
    from gnngpt.sampling import generate, sampling_failure

SEPARATOR = "---------------"
MIN_TEMPERATURE = 1e-30  # float32 logits divided by much less overflow to infinity, whose softmax is NaN


def build_parser():
    p = ArgumentParser(description="Sample text from a checkpoint written by pyg-gpt.py, gpt.py or bigram.py.")
    p.add_argument("--out_dir", default="runs/GATConv", metavar="DIR", type=path_value,
                   help="run directory holding ckpt.pt (default: runs/GATConv)")
    p.add_argument("--prompt", "--start", default="\n",
                   help="text the samples continue, or FILE:path to read it from a file; --start is nanoGPT's name "
                        "for it (default: a newline)")
    p.add_argument("--num_samples", type=int, default=10, help="samples to draw (default: 10)")
    p.add_argument("--max_new_tokens", type=int, default=500, help="characters generated per sample (default: 500)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="< 1 sharpens the predicted distribution, > 1 flattens it (default: 0.8)")
    p.add_argument("--top_k", type=int, default=200,
                   help="sample only among the k most likely characters; 0: no limit (default: 200)")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default: 1337)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help=f"where to run; {AUTO_DEVICE_HELP} (default: auto)")
    p.add_argument("--backend", choices=("fast", "pyg"),
                   help="GATConv, GATv2Conv and TransformerConv runs: sample with this backend instead of the run's "
                        "own; fast decodes with a cache (default: the run's)")
    p.add_argument("--compile", action="store_true",
                   help="compile the cached decoder's one-token step with torch.compile: seconds to tens of seconds "
                        "first, then several times faster per character on a CPU (for long samples)")
    p.add_argument("--no_cache", action="store_true",
                   help="run the lecture's sampler itself: a full forward pass over the last block_size characters "
                        "for every character (the default cached decoder draws from the same distribution)")
    return p


def check_args(args):
    check_output("the samples")
    for key in ("num_samples", "max_new_tokens"):
        check_count(f"--{key}", getattr(args, key))
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UsageError(f"--temperature must be a positive number, got {args.temperature}")
    if args.temperature < MIN_TEMPERATURE:
        raise UsageError(f"--temperature must be at least {MIN_TEMPERATURE:g}, got {args.temperature:g} (the logits "
                         f"divided by it can overflow); --top_k 1 always takes the most likely character")
    if args.top_k < 0:
        raise UsageError(f"--top_k must be 0 (no limit) or a positive integer, got {args.top_k}")
    if args.compile and args.no_cache:
        raise UsageError("--compile compiles the cached decoder's one-token step, which --no_cache does not run; "
                         "drop one of them")
    check_seed(args.seed)


def main(argv=None):
    """Print num_samples continuations of the prompt; bad input ends with a one-line error and exit code 2, a
    failure while sampling with one line and exit code 1."""
    return exit_code(run, build_parser().parse_args(argv))


def run(args):
    check_args(args)
    device = resolve_device(args.device)
    model, tokenizer, checkpoint = load_run_model(args.out_dir, device, args.backend)
    if args.compile and not model.supports_cache:
        fast = (args.backend != "fast" and hasattr(model, "blocks")  # layers with a dense form decode with a cache
                and not any(dense_refusal(block.mixer.conv) for block in model.blocks))
        raise UsageError(f"--compile compiles the cached decoder's one-token step, and the {checkpoint['name']} model "
                         f"of {args.out_dir}{' on --backend pyg' if args.backend == 'pyg' else ''} samples without "
                         f"the cache; drop --compile{', or sample with --backend fast' if fast else ''}")
    check_compile(args.compile, device)
    prompt = encode_prompt(tokenizer, read_prompt(args.prompt), device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    try:
        out = generate(model, prompt.repeat(args.num_samples, 1), args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k or None, generator=generator,
                       use_cache=not args.no_cache, compile=args.compile)  # (num_samples, T + max_new_tokens)
    except Exception as e:  # whatever sampling raised, in one line
        if out_of_memory(e):
            raise memory_error(e, "sampling does not fit in memory", f"draw fewer samples at once (--num_samples "
                               f"{args.num_samples}) or shorter ones (--max_new_tokens {args.max_new_tokens})"
                               ) from None
        if args.compile and (failure := compile_failure(e, "the cached decoder's one-token step")):
            raise Failure(f"{failure}; sample without --compile") from None
        error, decoder_raised = sampling_failure(e)
        advice = "; --no_cache samples without the cached decoder, which raised it" if decoder_raised else ""
        raise Failure(f"sampling failed ({error}){advice}") from None
    text = "".join(f"{tokenizer.decode(row)}\n{SEPARATOR}\n" for row in out.tolist())
    try:  # in one write, encoded whole before any of it is written
        sys.stdout.write(text)
    except UnicodeEncodeError as e:
        raise UsageError(f"the output's encoding, {e.encoding}, cannot write {e.object[e.start]!r}, a character of "
                         f"the samples; set PYTHONIOENCODING=utf-8") from None


if __name__ == "__main__":
    sys.exit(main())
