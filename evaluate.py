"""The exact validation loss of a trained run: every character of its validation split predicted once.

    python evaluate.py --out_dir runs/gpt                  # the run's validation split (the last 10% of its text)
    python evaluate.py --out_dir runs/gpt --write          # the same, written to the run's eval.json
    python evaluate.py --out_dir runs/gpt --data other.txt # all of another UTF-8 file
"""
import json
import statistics
import sys
from pathlib import Path

from gnngpt.errors import UsageError, check_count, check_output, exit_code, fitting, quiet_interrupt

with quiet_interrupt(__name__ == "__main__"):  # importing torch takes seconds: Ctrl-C then ends in one line
    from gnngpt import cli
    from gnngpt.data import load_text
    from gnngpt.evaluation import (
        batch_advice,
        describe_evaluation,
        encode_whole,
        exact_evaluation,
        in_batches,
        random_estimates,
        run_validation_split,
        write_eval,
    )
    from gnngpt.results import load_run_model
    from gnngpt.rundir import EVAL_FILE, in_shipped_plots, read_config


def build_parser():
    p = cli.ArgumentParser(description="Score a trained run exactly: consecutive windows of block_size characters, "
                                       "every character after the first a target once, in nats and bits per "
                                       "character.")
    p.add_argument("--out_dir", required=True, metavar="DIR", type=cli.path_value,
                   help="the run directory (with ckpt.pt)")
    p.add_argument("--data", metavar="FILE", type=cli.path_value,
                   help="evaluate all of this UTF-8 file instead of the run's validation split")
    p.add_argument("--device", choices=cli.DEVICES, default="auto", help=f"{cli.AUTO_DEVICE_HELP} (default: auto)")
    p.add_argument("--batch_size", type=int, help="windows per forward pass (default: the run's batch_size)")
    p.add_argument("--random_estimates", type=int, default=0, metavar="N",
                   help="also draw N random-batch estimates as training's evaluations make them (eval_iters batches "
                        "of the run), to see how far one falls from the exact loss (default: 0)")
    p.add_argument("--write", action="store_true",
                   help="write the result to the run's eval.json and loss_by_position.csv, as its training does at "
                        "its end (not with --data, nor over the eval.json of a run the repository ships in plots/)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def main(argv=None):
    """Evaluate; bad input ends with a one-line error and exit code 2."""
    return exit_code(run, build_parser().parse_args(argv))


def run(args):
    if not args.write:  # which writes the result to the run as well
        check_output("the result")
    if args.batch_size is not None:
        check_count("--batch_size", args.batch_size)
    check_count("--random_estimates", args.random_estimates, least=0)
    if args.random_estimates == 1:
        raise UsageError(f"--random_estimates must be 0 or at least 2 (a deviation needs two), got "
                         f"{args.random_estimates}")
    if args.write and args.data:
        raise UsageError("--write records the run's own validation split in its eval.json; drop --data or --write")
    if args.write and in_shipped_plots(args.out_dir) and (Path(args.out_dir) / EVAL_FILE).exists():
        raise UsageError(f"{args.out_dir} is a run this repository ships, whose {EVAL_FILE} only the command in its "
                         f"report writes; drop --write, or evaluate a copy of the run")
    device = cli.resolve_device(args.device)
    model, tokenizer, checkpoint = load_run_model(args.out_dir, device)
    name = checkpoint["name"]
    config = run_config(args.out_dir, checkpoint)
    if args.data:
        data, what = encode_whole(load_text(args.data), tokenizer.chars, args.data), f"all of {args.data}"
    else:
        data, what = (run_validation_split(config, tokenizer.chars, "evaluate another file with --data FILE"),
                      "its validation split")
    block_size = config["settings"]["block_size"]
    if args.random_estimates and len(data) <= block_size:
        longer = ", or give a longer --data" if args.data else ""
        raise UsageError(f"--random_estimates draws windows of block_size + 1 = {block_size + 1} characters, and "
                         f"{what} has {len(data):,}; drop --random_estimates{longer}")
    batch_size = args.batch_size or config["settings"]["batch_size"]
    with fitting(f"the evaluation {in_batches(batch_size)} does not fit in memory",
                 batch_advice(batch_size, "evaluate in smaller batches with a lower --batch_size")):
        result = exact_evaluation(model, data, config["settings"], device, batch_size, with_halves=not args.data)
    if args.random_estimates:
        with fitting(f"the random estimates {in_batches(config['settings']['batch_size'])}, the run's, do not fit in "
                     f"memory", "drop --random_estimates"):
            estimates = random_estimates(model, data, config["settings"], device, args.random_estimates)
        result["random_estimates"] = {"eval_iters": config["settings"]["eval_iters"], "values": estimates,
                                      "mean": statistics.fmean(estimates), "sd": statistics.stdev(estimates)}
    if args.write:
        write_eval(args.out_dir, result, checkpoint["step"])
    if args.json:
        print(json.dumps({"run": str(args.out_dir), "name": name, "data": args.data or config["data"],
                          "split": "all" if args.data else "val", **result}))
        return
    print(f"{name} ({args.out_dir}) on {what}: {describe_evaluation(result)}; in {result['eval_s']:.1f} s")
    if args.random_estimates:
        r = result["random_estimates"]
        print(f"{len(estimates)} random-batch estimates of {r['eval_iters']} batches: mean {r['mean']:.4f} "
              f"({r['mean'] - result['nats']:+.4f} from the exact loss), sample deviation {r['sd']:.4f}")
    if args.write:
        print(f"wrote {args.out_dir}/eval.json and loss_by_position.csv")


def run_config(out_dir, checkpoint):
    """The run's config.json, refused unless this project wrote it, for the model of the run's ckpt.pt
    (load_run_model's checkpoint)."""
    config = read_config(out_dir)
    settings = config.get("settings") if config is not None else None
    if not (isinstance(settings, dict) and isinstance(config.get("data"), str)
            and all(type(settings.get(key)) is int and settings[key] > 0
                    for key in ("block_size", "batch_size", "eval_iters"))):
        raise UsageError(f"{out_dir} has no readable config.json; evaluate a run written by this project")
    if config.get("name") != checkpoint["name"] or checkpoint["block_size"] not in (None, settings["block_size"]):
        raise UsageError(f"{out_dir}/config.json ({config.get('name')}, block_size {settings['block_size']}) is not "
                         f"that of its ckpt.pt ({checkpoint['name']}, block_size {checkpoint['block_size']}); "
                         f"evaluate a run whose files are its own")
    if None not in (checkpoint["data_sha256"], config.get("data_sha256")) \
            and checkpoint["data_sha256"] != config["data_sha256"]:
        raise UsageError(f"{out_dir}/ckpt.pt was trained on another text than its config.json records (by their "
                         f"data_sha256); evaluate a run whose files are its own")
    return config


if __name__ == "__main__":
    sys.exit(main())
