"""The outputs of a comparison (compare.py), from the small files of its finished runs: results.md and
val_loss.png, the layer leaderboard, or the graph study; and one sample per model."""
import shlex
from pathlib import Path

from . import rundir
from .config import PUBLISHED_STEP
from .errors import UsageError
from .evaluation import read_eval, read_eval_or_why
from .files import atomic_write_text, remove_leftovers
from .plan import first_seeds
from .plots import plot_graph_study, plot_leaderboard, plot_loss_by_position, plot_rates, plot_val_loss
from .results import (
    configurations,
    graph_comparisons,
    graph_study_table,
    leaderboard_table,
    position_comparisons,
    position_notes,
    published_val_loss,
    results_table,
    run_summary,
    seconds_to_target,
    setting_notes,
    target_table,
    uncertainty_notes,
)
from .rundir import has_checkpoint, in_shipped_plots, is_finished, missing_final_files, read_config
from .runner import write_missing_sample
from .sampling import sample_path
from .tuning import choose_rates, rate_table, tuned_table, tuning_notes

REPORT_FILES = ("results.md", "leaderboard.md", "graphs.md")


def check_shipped_out(out, runs, flag):
    """UsageError when out's model_outputs folder, where a comparison that is not the published one puts its
    samples, is the one this repository ships, when out lies among the runs it reports on in the repository's
    plots/, where each report sits beside the folder of its runs, when out holds a run, or when it is a folder of
    samples or runs that the repository ships (rundir.shipped_folder) and holds no report; flag is the one that
    gave out (--out, or --runs without it)."""
    if (Path(out) / "model_outputs").resolve() == rundir.SHIPPED_SAMPLES.resolve():
        raise UsageError(f"{flag} {out} would put the samples over {rundir.SHIPPED_SAMPLES}, the ones this repository "
                         f"ships (only the published comparison writes them: --out plots/paper at the paper "
                         f"preset); choose another {flag}")
    if in_shipped_plots(out) and Path(out).resolve().is_relative_to(Path(runs).resolve()):
        raise UsageError(f"{flag} {out} would put the report among the runs of {runs} in the repository's plots/, "
                         f"where each report sits beside the folder of its runs; give --out another directory, such "
                         f"as {Path(runs).parent}")
    if rundir.holds_run(out):
        raise UsageError(f"{flag} {out} holds a run, which the report would be mixed into; give --out a directory of "
                         f"its own")
    if rundir.shipped_folder(out) and not any((Path(out) / name).is_file() for name in REPORT_FILES):
        raise UsageError(f"{flag} {out} is a folder of samples or runs that this repository ships; give --out a "
                         f"directory of its own")


def check_report_owner(out, runs, argv):
    """UsageError when out holds a report (results.md, leaderboard.md or graphs.md) made from the runs of another
    directory than runs: a comparison writes over the report of its own runs alone (the command that made it, or
    the same on more runs or with --report_only), never over another's. A report this repository ships (under
    SHIPPED_REPORTS) is written over by its own command alone, with or without --report_only: argv, compare.py's
    command line, must be that. The report's --runs is read where its command ran: the directory that holds its
    --out as out does now."""
    for name in REPORT_FILES:
        try:
            made_by = (Path(out) / name).read_text(encoding="utf-8").split("`")[1]
            made_argv = shlex.split(made_by)
        except (OSError, UnicodeDecodeError, IndexError, ValueError):
            continue  # no report there, or none this project wrote
        if made_argv[:2] != ["python", "compare.py"]:
            continue
        if in_shipped_plots(out) and without_report_only(made_argv[2:]) != without_report_only(argv):
            raise UsageError(f"--out {out} holds {name}, a report in the repository's plots/, where it keeps the "
                             f"reports it ships, which only the command that made it writes over: {made_by} (from "
                             f"the repository's root; add --report_only to rebuild it from its runs); choose "
                             f"another --out for other settings")
        made_runs = last_value(made_argv, "--runs", "runs")
        if (ran_in(out, last_value(made_argv, "--out", made_runs)) / made_runs).resolve() != Path(runs).resolve():
            raise UsageError(f"--out {out} holds {name}, the report of the runs in {made_runs}; pass --runs "
                             f"{made_runs} to make it again, or choose another --out")


def without_report_only(argv):
    return [a for a in argv if a != "--report_only"]


def last_value(argv, flag, default):
    """The value of the last flag in argv (as --flag VALUE or --flag=VALUE), as argparse reads it; else default."""
    at = [i for i, a in enumerate(argv[:-1]) if a == flag] + [i for i, a in enumerate(argv) if a.startswith(flag + "=")]
    if not at:
        return default
    last = argv[max(at)]
    return argv[max(at) + 1] if last == flag else last.split("=", 1)[1]


def ran_in(out, made_out):
    """The directory a report's command ran in: the one that holds its --out (made_out) where out lies now; the
    current directory where that cannot be told (an absolute --out, or one that is not out's tail)."""
    here, made = Path(out).resolve().parts, Path(made_out).parts
    if not made or Path(made_out).is_absolute() or here[-len(made):] != made:
        return Path.cwd()
    return Path(*here[:-len(made)])


def model_samples_dir(out, configs, shipped=True):
    """Where a comparison keeps one sample per model: the repository's model_outputs/, the shipped samples, for the
    published comparison, a comparison of models (shipped) whose figures go to the repository's plots/paper/ (from
    whatever directory it runs) and whose configurations all train at the paper preset's settings (how often and on
    how many batches it estimates the loss aside); else the model_outputs folder of its --out."""
    published = (shipped and Path(out).resolve() == rundir.PUBLISHED_REPORT.resolve()
                 and all(c["preset"] == "paper" for c in configs)
                 and not setting_notes(configs, ignored=("eval_interval", "eval_iters")))
    return rundir.SHIPPED_SAMPLES if published else Path(out) / "model_outputs"


def write_model_samples(runs, out, shipped):
    """Each model's sample, its first seed's (at its chosen learning rate where the runs choose one), in
    model_samples_dir/<model>.txt; a run without a sample of its own (see sampling.sample_path) gets one from its
    checkpoint first, the one its training would have written (runner.write_missing_sample)."""
    configs = summarized(runs)
    choices = rate_choices(configs) if tuned(runs) else None
    directory = model_samples_dir(out, configs, shipped)
    remove_leftovers(directory, ("*.txt",))  # of a comparison killed while it wrote them
    for run in sampled_runs(runs, choices):
        source = sample_path(run.out_dir)
        if not source.exists():
            write_missing_sample(run, source)
        atomic_write_text(directory / f"{run.config_name}.txt", source.read_text(encoding="utf-8"))


def summarized(runs, at=None):
    """The configurations of runs (results.configurations), each run as it was at step at (None: its last)."""
    return configurations([run_summary(r.out_dir, at) for r in runs])


def tuned(runs):
    """Whether the runs choose a learning rate: some configuration trained at several."""
    rates = {}
    for r in runs:
        rates.setdefault(r.config_name, set()).add(r.expected["settings"]["learning_rate"])
    return any(len(grid) > 1 for grid in rates.values())


def sampled_runs(runs, choices=None):
    """The run whose sample stands for each configuration: its first seed's, at its chosen learning rate where
    choices (tuning.Choice of each configuration) are given."""
    if choices is not None:
        chosen = {(c.name, c.chosen["learning_rate"]) for c in choices}
        runs = [r for r in runs if (r.config_name, r.expected["settings"]["learning_rate"]) in chosen]
    return first_seeds(runs)


def rate_choices(configs, failed=None):
    """The learning rate chosen for each configuration (see tuning.choose_rates, and its failed); UsageError naming
    those whose runs' eval.json lacks the halves of the validation split that the choice needs."""
    lacking = [c["name"] for c in configs if c["halves"] is None]
    if lacking:
        raise UsageError(f"{', '.join(dict.fromkeys(lacking))} ha{'s' if len(lacking) == 1 else 've'} runs whose "
                         f"eval.json lacks the exact loss of the validation split's halves, which choosing a rate "
                         f"needs; python evaluate.py --out_dir RUN --write adds it from the run's checkpoint")
    return choose_rates(configs, failed)


def report(runs, states, args, out, argv, baseline, layer_records, pairs):
    """--report_only: the tables, figures and samples of finished runs, from their small files; refused while any
    run is unfinished or lacks its exact validation loss."""
    at, wanted = args.report_step, "eval.json" if args.report_step is None else f"eval_step{args.report_step}.json"
    past = next((r for r in runs if at is not None and at > r.expected["settings"]["max_iters"]), None)
    if past:
        raise UsageError(f"--report_step {at} is past the last step of {past.out_dir} "
                         f"({past.expected['settings']['max_iters']}); choose a step up to it")
    between = next((r for r in runs if at is not None and at != r.expected["settings"]["max_iters"]
                    and at % r.expected["settings"]["eval_interval"]), None)
    if between:
        every = between.expected["settings"]["eval_interval"]
        raise UsageError(f"--report_step {at} is not an evaluation step of {between.out_dir} (every {every} steps, and "
                         f"the last); choose one of those")

    def step_of(run):
        return run.expected["settings"]["max_iters"] if at is None else at

    why = {"new": "not there", "resume": "not finished", "restart": "not finished", "submitted": "not finished"}

    def why_missing(run):
        if states[run.name] == "replace":
            return "; ".join(["other settings", *run.differences()])
        if states[run.name] != "lost":
            return why.get(states[run.name]) or read_eval_or_why(run.out_dir, step_of(run), snapshot_step(run, at))[1]
        lacks, last = missing_final_files(run.out_dir), run.expected["settings"]["max_iters"]
        what = ("not finished" if not is_finished(run.out_dir, read_config(run.out_dir)) else
                f"no {' or '.join(lacks)}" if lacks else read_eval_or_why(run.out_dir, last)[1])
        checkpoint = "a checkpoint that cannot be read" if has_checkpoint(run.out_dir) else "no checkpoint"
        return f"{what}, and {checkpoint} to go on from"

    lacking = [r for r in runs if states[r.name] != "reuse"
               or read_eval(r.out_dir, step_of(r), snapshot_step(r, at)) is None]
    if lacking:
        given = ("give the settings the runs were trained with (a relative --data as it was given, from the directory "
                 "they were trained in)")
        again = ("in another --runs (a finished run keeps no earlier weights)"
                 if any(in_shipped_plots(r.out_dir) for r in lacking) else
                 "(a finished one keeps no earlier weights: delete its run directory first)")
        train = ("run the same command without --report_only" if at is None else
                 f"train them with --exact_at {at} among the training flags {again}")
        if any(states[r.name] == "lost" for r in lacking):
            train += ", with --overwrite for those that can neither be reused nor resumed"
        other = sum(states[r.name] == "replace" for r in lacking)
        fix = (train if not other else given if other == len(lacking) else
               f"for those of other settings, {given}; for the others, {train}")
        missing = ", ".join(f"{r.out_dir} ({why_missing(r)})" for r in lacking)
        raise UsageError(f"--report_only needs every run finished with its {wanted}, and {missing} "
                         f"{'is' if len(lacking) == 1 else 'are'} not; {fix}")
    if at is None:  # the samples are the last checkpoint's: a report of an earlier step has none
        write_model_samples(runs, out, shipped=layer_records is None and len(pairs) == 1)
    write_report(runs, args, out, argv, baseline, layer_records, pairs, {})
    return 0


def snapshot_step(run, at):
    """The step of the snapshot to read for the run reported at step at: None (its eval.json) at its last."""
    return None if at == run.expected["settings"]["max_iters"] else at


def write_report(runs, args, out, argv, baseline, layer_records, pairs, failed):
    """The comparison's tables and figures, from the small files of its finished runs: runs are all it planned,
    failed {name: exit code} those whose training failed, which the report names."""
    done = [r for r in runs if r.name not in failed]
    configs = summarized(done, args.report_step)
    if not configs:
        return
    remove_leftovers(out, ("*.md", "*.png"))  # of a comparison killed while it wrote its report
    if args.report_step is None:  # a rebuilt report reads as the one the trainings wrote
        argv = [a for a in argv if a != "--report_only"]
    left_out = failure_note(runs, failed, None if layer_records is not None else baseline)  # a leaderboard ranks
    choices = rate_choices(configs, failed_rates(runs, failed)) if tuned(runs) else None
    seeds = {r.config_name: r.seed for r in sampled_runs(done, choices)} if args.report_step is None else None
    if choices is not None:
        write_tuned_comparison(choices, next((c for c in choices if c.name == baseline), None), args.target_loss,
                               seeds, out, argv, args.jobs, left_out)
        return
    baseline = next((c for c in configs if c["name"] == baseline), None)
    if layer_records is not None:  # the leaderboard instead, so that the comparison's plot stays
        write_leaderboard(configs, layer_records, out, argv, args.jobs, left_out)
    elif len(pairs) > 1:  # a graph study, likewise
        write_graph_study(configs, baseline, args.target_loss, out, argv, args.jobs, left_out)
    else:
        write_comparison(configs, baseline, args.target_loss, seeds, out, argv, args.jobs, left_out)


def failure_note(runs, failed, baseline):
    """The paragraph of a report that names the runs it leaves out because their training failed, and says so
    where that leaves it without its baseline (the name of a configuration, or None)."""
    if not failed:
        return ""
    text = (f"Not reported, their training failed: {', '.join(f'{n} (exit code {c})' for n, c in failed.items())}; "
            f"the same command trains them again and reuses the finished runs.")
    if baseline is not None and all(r.name in failed for r in runs if r.config_name == baseline):
        text += f" The baseline {baseline} is among them, so no difference from it is shown."
    return text + "\n\n"


def failed_rates(runs, failed):
    """The learning rates at which every run of a configuration failed: {name: {rate: the exit code of its first
    failed run}}."""
    groups = {}
    for r in runs:
        groups.setdefault((r.config_name, r.expected["settings"]["learning_rate"]), []).append(r)
    rates = {}
    for (name, rate), group in groups.items():
        if all(r.name in failed for r in group):
            rates.setdefault(name, {})[rate] = failed[group[0].name]
    return rates


def describe(configs):
    """The presets and machines of the runs, for titles."""
    presets = ", ".join(dict.fromkeys(c["preset"] for c in configs))
    machines = "; ".join(dict.fromkeys(r["machine"] for c in configs for r in c["runs"]))
    return f"preset {presets}, {machines}"


def command(argv):
    return shlex.join(["python", "compare.py", *argv])


def statistics_text(configs, baseline, target_loss):
    """What the loss columns mean and, with target_loss, the table of when each configuration reached it."""
    text = uncertainty_notes(configs, baseline) + "\n"
    if target_loss is not None:
        text += target_text(configs, target_loss)
    return text


def target_text(configs, target_loss, which=""):
    """The table of when each configuration (which: of which runs) reached target_loss, with its heading."""
    return (f"Time to a validation loss of {target_loss}{which} (the random-batch estimates of each evaluation, "
            f"mean ± sample deviation over seeds):\n\n{target_table(configs, target_loss)}\n")


def write_comparison(configs, baseline, target_loss, seeds, out, argv, jobs, left_out):
    """val_loss.png, loss_by_position.png and results.md: the table, with the published values, any setting that
    is not the preset's and the runs left out (failure_note)."""
    published = {c["name"]: published_val_loss(c) for c in configs if published_val_loss(c) is not None}
    plot_val_loss(configs, out / "val_loss.png", f"Validation loss ({describe(configs)})", published,
                  PUBLISHED_STEP)
    notes = statistics_text(configs, baseline, target_loss)
    if published:
        notes += (f"published: the original's validation loss after {PUBLISHED_STEP} steps of the paper preset on "
                  f"an A100, read from its plot (random batches, one seed).\n\n")
    notes += run_notes(configs, jobs) + position_figure(configs, out / "loss_by_position.png")
    text = (f"# Results\n\nMade by `{command(argv)}` ({describe(configs)}).\n\n"
            f"{results_table(configs, baseline)}\n{left_out}{notes}"
            f"{samples_line(configs, seeds, model_samples_dir(out, configs))}")
    atomic_write_text(out / "results.md", text)
    print(f"wrote {out / 'val_loss.png'}, {out / 'results.md'} and, where runs have it, "
          f"{out / 'loss_by_position.png'}")


def run_notes(configs, jobs, ignored=()):
    """The notes under a comparison's tables: the settings that differ from the preset (but those ignored), the
    machines and torch versions where the runs were measured on more than one, and how many runs trained at once,
    as their config.json records it (for runs from before it did, the --jobs of this command)."""
    notes = ""
    differences = setting_notes(configs, ignored)
    if differences:
        notes += "Settings that differ from the preset:\n\n" + "".join(f"{line}\n" for line in differences) + "\n"
    measured = dict.fromkeys((r["machine"], r["torch"]) for c in configs for r in c["runs"])
    if len(measured) > 1:
        notes += ("The runs were measured on more than one machine or torch version (" + "; ".join(
            f"{machine}, torch {torch or 'not recorded'}" for machine, torch in measured) + "): compare tokens/s and "
            "times only between runs measured alike.\n\n")
    recorded = [r["runs_at_once"] for c in configs for r in c["runs"]]
    at_once = max(n or 1 for n in recorded)
    if None in recorded and jobs > 1:
        others = f"; {at_once} as the others record it" if at_once > jobs else ""
        notes += (f"Up to {max(jobs, at_once)} runs trained at once (--jobs {jobs}{others}): the tokens/s and wall "
                  f"times of those trained by this command were measured while they shared the machine.\n\n")
    elif at_once > 1:
        notes += (f"Up to {at_once} runs trained at once: the tokens/s and wall times of the runs that did so were "
                  f"measured while they shared the machine.\n\n")
    return notes


def position_figure(configs, path, which=""):
    """Draw the loss by position of configs to path; a line for the report that says what it holds (which: of
    which runs)."""
    missing = plot_loss_by_position(configs, path, f"Loss by position in the window ({describe(configs)})")
    drawn = f"`{path.name}`{which}: the exact validation loss at each offset of the windows, mean over seeds"
    if len(missing) == len(configs):
        return f"No loss by position: no run has loss_by_position.csv ({', '.join(missing)}).\n\n"
    if missing:
        return f"{drawn}; without {', '.join(missing)}, whose runs have no readable loss_by_position.csv.\n\n"
    return f"{drawn}.\n\n"


def samples_line(configs, seeds, directory):
    """Where each configuration's sample is (directory: model_samples_dir of all the comparison's runs); nothing
    for a report of an earlier step (seeds None), whose runs' samples are those of their last step."""
    if seeds is None:
        return ""
    names = list(dict.fromkeys(c["name"] for c in configs))
    if directory == rundir.SHIPPED_SAMPLES:  # named as from the repository's root, where the report is read
        directory = Path(directory.name)
    return "Samples: " + ", ".join(f"`{(directory / (name + '.txt')).as_posix()}` (seed {seeds[name]})"
                                   for name in names) + ".\n"


def write_tuned_comparison(choices, baseline, target_loss, seeds, out, argv, jobs, left_out):
    """results.md with each configuration at its own learning rate (see tuning), learning_rates.png (the test-half
    loss against the rate), and val_loss.png and loss_by_position.png of the chosen rates' runs; left_out: see
    failure_note."""
    chosen = [c.chosen for c in choices]
    title = f"{describe(chosen)}, each at its chosen learning rate"
    plot_val_loss(chosen, out / "val_loss.png", f"Validation loss ({title})")
    plot_rates(choices, out / "learning_rates.png", f"Loss against learning rate ({describe(chosen)})")
    every = [c for choice in choices for c in choice.by_rate]
    notes = tuning_notes(choices, baseline) + "\n"
    notes += "Every configuration at every learning rate (mean ± sample standard deviation over seeds):\n\n"
    notes += rate_table(choices) + "\n"
    if target_loss is not None:
        notes += target_text(chosen, target_loss, " at the chosen rates")
    notes += run_notes(every, jobs, ignored=("learning_rate",))
    notes += position_figure(chosen, out / "loss_by_position.png", ", at the chosen rates")
    text = (f"# Results: each model at its own learning rate\n\nMade by `{command(argv)}` ({describe(every)}).\n\n"
            f"{tuned_table(choices, baseline)}\n{left_out}{notes}"
            f"{samples_line(chosen, seeds, model_samples_dir(out, every))}")
    atomic_write_text(out / "results.md", text)
    print(f"wrote {out / 'val_loss.png'}, {out / 'learning_rates.png'}, {out / 'results.md'} and, where runs have "
          f"it, {out / 'loss_by_position.png'}")


def write_leaderboard(configs, records, out, argv, jobs, left_out):
    """The leaderboard table and figure, the layers that could not take part with their reasons and the runs left
    out (failure_note)."""
    plot_leaderboard(configs, out / "leaderboard.png", f"Token-mixer leaderboard ({describe(configs)})")
    unsupported = [r for r in records if not r.works]
    text = (f"# Layer leaderboard\n\nMade by `{command(argv)}` ({describe(configs)}).\n\n"
            f"{leaderboard_table(configs)}\n{left_out}{uncertainty_notes(configs, None)}\n{run_notes(configs, jobs)}")
    if unsupported:
        text += "Not ranked:\n\n" + "".join(f"- {r.name}: {r.reason}\n" for r in unsupported)
    atomic_write_text(out / "leaderboard.md", text)
    print(f"wrote {out / 'leaderboard.png'} and {out / 'leaderboard.md'}")


def write_graph_study(configs, baseline, target_loss, out, argv, jobs, left_out):
    """Validation loss against edges per token and against training speed, one point per model, graph and
    positions, with the table behind it, the paired differences the study draws and the runs left out
    (failure_note)."""
    plot_graph_study(configs, out / "graphs.png", f"Context graphs ({describe(configs)})")
    text = (f"# Context graphs\n\nMade by `{command(argv)}` ({describe(configs)}).\n\n"
            f"{graph_study_table(configs, baseline)}\n{left_out}{position_notes(configs)}"
            f"{statistics_text(configs, baseline, target_loss)}{run_notes(configs, jobs, ignored=('graph', 'pos'))}"
            f"{position_comparisons(configs)}"
            f"{position_figure(configs, out / 'graphs_by_position.png')}")
    if comparisons := graph_comparisons(configs):
        text += (f"Paired differences (configuration minus the one it is compared with, same seeds; number of seeds "
                 f"both have in parentheses):\n\n{comparisons}")
    if target_loss is not None and (comparisons := graph_comparisons(
            configs, lambda c: seconds_to_target(c, target_loss), "Δ training seconds", 1)):
        text += (f"\nThe same pairs in training seconds to a validation loss of {target_loss} (seeds that reached "
                 f"it in both):\n\n{comparisons}")
    atomic_write_text(out / "graphs.md", text)
    print(f"wrote {out / 'graphs.png'}, {out / 'graphs.md'} and, where runs have it, {out / 'graphs_by_position.png'}")
