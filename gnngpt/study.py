"""A comparison (compare.py) from its parsed flags: the checks and the plan (gnngpt/plan.py), the state of each
run, their training (gnngpt/runner.py, or gnngpt/slurm.py) and the tables, figures and samples
(gnngpt/report.py)."""
import math
import sys
from pathlib import Path

from . import runner, slurm
from .data import check_length, split
from .errors import UsageError, check_count
from .plan import plan_comparison
from .report import (
    check_report_owner,
    check_shipped_out,
    report,
    write_model_samples,
    write_report,
)
from .rundir import file_in_the_way, in_shipped_plots, read_config, remove_run_leftovers, unwritable

GO_ON = "run the same command again to go on: finished runs are reused and stopped ones resume"


def compare(args, extra, argv):
    """compare.py with its parsed flags, extra the training flags to pass through and argv its command line (for
    the report): the runs planned and checked, then trained (here, in child processes or as SLURM jobs) and
    reported, or --report_only's report alone. The exit code: 0, 1 when a training failed, or that of a stop by
    SIGINT or SIGTERM."""
    check_count("--jobs", args.jobs)
    launcher = slurm.options(args)  # None for --launcher local
    if launcher:
        args.device = launcher.device  # that of each job, checked by its training on its node
    if args.report_step is not None:
        check_count("--report_step", args.report_step)
    if args.report_step is not None and not args.report_only:
        raise UsageError("--report_step reports finished runs as they were at that step; add --report_only (and "
                         "train them first, with --exact_at among the training flags)")
    if args.target_loss is not None and not 0 < args.target_loss < math.inf:
        raise UsageError(f"--target_loss must be a positive number, got {args.target_loss}")
    out = Path(args.out or args.runs)
    runs_check = file_in_the_way if args.report_only else unwritable  # a report only reads the runs
    checks = ((runs_check, "--runs", args.runs), (unwritable, "--out", out),
              (file_in_the_way, "--out", out / "model_outputs"))  # where its samples go (report.model_samples_dir)
    for check, flag, directory in checks:
        if refusal := check(directory, flag):
            raise UsageError(refusal)
    check_report_owner(out, args.runs, argv)
    check_shipped_out(out, args.runs, "--out" if args.out else "--runs")
    runs, baseline, layer_records, pairs, text = plan_comparison(args, extra, out)
    if in_the_way := next((r for r in runs if r.out_dir.exists() and not r.out_dir.is_dir()), None):
        raise UsageError(f"{in_the_way.out_dir} is a file where the run {in_the_way.name} goes; move it away or "
                         f"choose another --runs")
    waiting = slurm.waiting_runs(runs, launcher) if launcher else set()  # their jobs are still going
    states = {r.name: "submitted" if r.name in waiting else r.state() for r in runs}
    if args.report_only:
        return report(runs, states, args, out, argv, baseline, layer_records, pairs)
    if kept := next((r for r in runs if states[r.name] in ("replace", "lost") and in_shipped_plots(r.out_dir)), None):
        why = "; ".join(kept.differences()) or "no checkpoint to resume from"
        raise UsageError(f"{kept.out_dir} holds a run in the repository's plots/, where it keeps the runs it ships, "
                         f"and these settings can neither reuse nor resume it ({why}); choose another --runs")
    taken = [r for r in runs if states[r.name] in ("replace", "lost")]
    if taken and not args.overwrite:
        run, differences = next(((r, d) for r in taken if states[r.name] == "replace" and (d := r.differences())),
                                (None, []))
        why = f"; {run.out_dir}: {'; '.join(differences)}" if differences else ""
        raise UsageError(f"{', '.join(str(r.out_dir) for r in taken)} already hold runs that these settings can "
                         f"neither reuse nor resume (other settings, or no checkpoint to resume from{why}); pass "
                         f"--overwrite to replace them or --runs DIR to train elsewhere")

    for r in runs:
        if states[r.name] == "reuse":
            print(f"{r.name}: reusing the finished run in {r.out_dir}")
    pending = [r for r in runs if states[r.name] != "reuse"]
    if pending:
        # checked once, before any training reads the text; one token a character
        train, val = split(range(len(text)))
        check_length(len(train), len(val), max(r.expected["settings"]["block_size"] for r in pending))
    if launcher:
        stopped, failed = slurm.train_as_jobs(pending, states, runner.training_command, launcher)
    elif args.jobs == 1:
        stopped, failed = runner.train_here(pending, states)
    else:
        stopped, failed = runner.train_in_processes(pending, states, args.jobs, len(runs))
    if stopped:  # by SIGINT or SIGTERM
        print(f"compare.py stopped; {GO_ON}", file=sys.stderr)
        return stopped
    for r in runs:
        if r.name not in failed and read_config(r.out_dir) is None:
            print(f"error: {r.name}: {r.out_dir} no longer holds its run's config.json (removed or damaged while the "
                  f"comparison ran)", file=sys.stderr)
            failed[r.name] = 1
    done = [r for r in runs if r.name not in failed]
    for r in done:
        remove_run_leftovers(r.out_dir)  # of a training or a comparison killed while it wrote the run's files
        runner.write_missing_exact_loss(r)
        runner.write_missing_own_sample(r)
    write_model_samples(done, out, shipped=layer_records is None and len(pairs) == 1)
    write_report(runs, args, out, argv, baseline, layer_records, pairs, failed)
    if failed:
        print(f"error: training failed for {', '.join(failed)} (see the errors above); run compare.py again to "
              f"retry them: finished runs are reused", file=sys.stderr)
        return 1
    return 0
