"""compare.py --launcher slurm (gnngpt.slurm) without a cluster: submitit's local executor runs the jobs as
processes here, and stand-ins for sbatch and sacct let SLURM's own executor submit and follow jobs that never run."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from test_compare import compare_main

from conftest import table_rows
from gnngpt import runner, slurm
from gnngpt.guard import one_thread
from gnngpt.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]
FAKE_SBATCH = """#!/bin/sh
# sbatch's stand-in: keeps each submission script and answers as sbatch does, with job ids from 42 on; it knows
# no partition nopart
if grep -q -- "--partition=nopart" "$1"; then
  echo "sbatch: error: invalid partition specified: nopart" >&2
  echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
  exit 1
fi
n=$(( $(cat "$FAKE_SLURM/submissions" 2>/dev/null || echo 0) + 1 ))
echo $n > "$FAKE_SLURM/submissions"
cp "$1" "$FAKE_SLURM/submission_$n.sh"
echo "Submitted batch job $(( 41 + n ))"
"""
FAKE_SACCT = """#!/bin/sh
# sacct's stand-in: each job asked for is an array of tasks 0 and 1, in the state written in $FAKE_SLURM/state
echo "JobID|State|NodeList"
for arg; do
  case $arg in [0-9]*) for task in 0 1; do echo "${arg}_$task|$(cat "$FAKE_SLURM/state")|node1"; done;; esac
done
"""
NOT_CALLED = "#!/bin/sh\nexit 1\n"


@pytest.fixture
def slurm_commands(tmp_path_factory, monkeypatch):
    """Stand-ins for sbatch, srun and sacct first on the PATH; their folder, where sbatch keeps what it gets."""
    folder = tmp_path_factory.mktemp("fake_slurm")
    for name, script in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", NOT_CALLED)):
        (folder / name).write_text(script)
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(folder))
    return folder


@pytest.fixture
def local_jobs(slurm_commands, in_tmp_path, tiny_text_file, monkeypatch):
    """compare.py --launcher slurm in tmp_path with submitit's local executor in SLURM's place: every job runs as a
    process here (and sbatch is never called). Returns the names of the submitted jobs' files under DIR/slurm."""
    submitit = pytest.importorskip("submitit")
    monkeypatch.setattr(slurm, "new_executor", submitit.LocalExecutor)
    return lambda runs: sorted(p.name for p in (in_tmp_path / runs / "slurm").glob("*_submitted.pkl"))


def record(runs):
    return json.loads((Path(runs) / "slurm" / "jobs.json").read_text())


def losses(run_dir):
    return [(r["step"], r["train_loss"], r["val_loss"]) for r in read_metrics(run_dir)]


def test_jobs_give_the_metrics_of_one_at_a_time_and_only_missing_runs_are_submitted_again(local_jobs, tmp_path,
                                                                                         monkeypatch, capsys):
    monkeypatch.setattr("gnngpt.sampling.SAMPLE_LENGTH", 500)  # the length the jobs' trainings write
    names = ["bigram", "gpt"]
    as_jobs = ["--models", "bigram,gpt", "--runs", "jobs", "--out", "jobs", "--launcher", "slurm",
               "--slurm_cpus", "1"]
    with one_thread():  # the thread count of each job's training: --slurm_cpus 1
        assert compare_main("--models", "bigram,gpt", "--runs", "one", "--out", "one") == 0
    samples = {name: (tmp_path / "one" / "model_outputs" / f"{name}.txt").read_text() for name in names}
    capsys.readouterr()
    assert compare_main(*as_jobs) == 0
    out = capsys.readouterr().out
    jobs = record("jobs")
    assert local_jobs("jobs") == sorted(f"{jobs[f'{name}_s1337']['job']}_submitted.pkl" for name in names)
    for name in names:
        run_name = f"{name}_s1337"  # the run of seed 1337
        run = tmp_path / "jobs" / run_name
        assert losses(run) == losses(tmp_path / "one" / run_name)
        assert (tmp_path / "jobs" / "model_outputs" / f"{name}.txt").read_text() == samples[name]
        assert f"step 4: train loss {read_metrics(run)[-1]['train_loss']:.4f}" in (run / "train.log").read_text()
        assert (tmp_path / "jobs" / "slurm" / f"{jobs[run_name]['job']}_0_log.out").is_file()
        assert f"{run_name}: submitted as job {jobs[run_name]['job']}, training in jobs/{run_name}\n" in out
        status = rf"^{run_name} +done +step 4/4 +val loss {read_metrics(run)[-1]['val_loss']:.4f} "
        assert re.search(status, out, re.MULTILINE), out
    assert [row[0] for row in table_rows((tmp_path / "jobs" / "results.md").read_text())] == names

    assert compare_main(*as_jobs) == 0
    assert capsys.readouterr().out.startswith("bigram_s1337: reusing the finished run in jobs/bigram_s1337\n"
                                              "gpt_s1337: reusing the finished run in jobs/gpt_s1337\n")
    assert len(local_jobs("jobs")) == 2  # nothing submitted

    shutil.rmtree(tmp_path / "jobs" / "gpt_s1337")
    assert compare_main(*as_jobs) == 0
    out = capsys.readouterr().out
    again = record("jobs")
    assert again["bigram_s1337"] == jobs["bigram_s1337"] and again["gpt_s1337"]["job"] != jobs["gpt_s1337"]["job"]
    assert len(local_jobs("jobs")) == 3
    assert out.startswith(f"bigram_s1337: reusing the finished run in jobs/bigram_s1337\n"
                          f"gpt_s1337: submitted as job {again['gpt_s1337']['job']}, training in jobs/gpt_s1337\n")
    assert losses(tmp_path / "jobs" / "gpt_s1337") == losses(tmp_path / "one" / "gpt_s1337")


def test_a_failed_job_is_reported_with_its_log_and_the_others_results_are_kept(local_jobs, tmp_path, monkeypatch,
                                                                                capsys):
    real_command = runner.training_command

    def refused_for_gpt(run, state):  # gpt's training refuses its arguments
        return real_command(run, state) + ["--n_head", "3"] * (run.config_name == "gpt")

    monkeypatch.setattr(runner, "training_command", refused_for_gpt)
    assert compare_main("--models", "bigram,gpt", "--launcher", "slurm") == 1
    captured = capsys.readouterr()
    log = Path("runs") / "gpt_s1337" / "train.log"
    assert (f"error: gpt_s1337 failed: n_embd 16 is not divisible by n_head 3; choose --n_embd as a multiple of "
            f"--n_head (exit code 2; its output is in {log})\n") in captured.err
    assert re.search(rf"^gpt_s1337 +failed .*exit code 2, log {log}$", captured.out, re.MULTILINE), captured.out
    assert captured.err.endswith("error: training failed for gpt_s1337 (see the errors above); run compare.py again "
                                 "to retry them: finished runs are reused\n")
    assert [row[0] for row in table_rows((tmp_path / "plots" / "results.md").read_text())] == ["bigram"]
    assert read_metrics(tmp_path / "runs" / "bigram_s1337")[-1]["step"] == 4


def test_on_slurm_a_stopped_wait_leaves_the_jobs_and_the_same_command_gathers_them(slurm_commands, in_tmp_path,
                                                                                   tiny_text_file, monkeypatch,
                                                                                   capsys):
    pytest.importorskip("submitit")
    from submitit.helpers import DelayedSubmission
    from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

    monkeypatch.setattr(SlurmJob, "watcher", SlurmInfoWatcher())  # no states of other tests' jobs
    monkeypatch.setattr(SlurmJob, "_results_timeout_s", 0)  # no wait for the result files of jobs that never run
    real_follow = slurm.follow

    def follow_then_ctrl_c(job, board):
        real_follow(job, board)
        os.kill(os.getpid(), signal.SIGINT)

    def slurm_says(state):
        (slurm_commands / "state").write_text(state)

    monkeypatch.setattr(slurm, "follow", follow_then_ctrl_c)
    runs = in_tmp_path / "runs"
    args = ["--models", "bigram,gpt", "--device", "auto", "--dtype", "bfloat16", "--launcher", "slurm",
            "--slurm_partition", "gpu", "--slurm_time", "1-00:00", "--slurm_gpus", "1", "--slurm_cpus", "8",
            "--slurm_args", "account=abc,mail-type=BEGIN,END"]
    stop = ("SIGINT: compare.py stops waiting and leaves the jobs to SLURM; the same command gathers them when they "
            "end; to cancel them: scancel 42_0 42_1\ncompare.py stopped; run the same command again to go on: "
            "finished runs are reused and stopped ones resume\n")
    slurm_says("PENDING")
    assert compare_main(*args) == 130
    captured = capsys.readouterr()
    assert captured.err.endswith(stop)
    assert captured.out.startswith("bigram_s1337: submitted as job 42_0, training in runs/bigram_s1337\n"
                                   "gpt_s1337: submitted as job 42_1, training in runs/gpt_s1337\n")
    assert re.search(r"^bigram_s1337 +queued ", captured.out, re.MULTILINE), captured.out
    script = (slurm_commands / "submission_1.sh").read_text().splitlines()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=gpu", "#SBATCH --time=1440",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --account=abc",
                 "#SBATCH --mail-type=BEGIN,END", f"#SBATCH --output={runs}/slurm/%A_%a_0_log.out",
                 "#SBATCH --signal=USR2@90",  # the warning that run_training passes on to the training as SIGTERM
                 f"export PYTHONPATH={ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"):
        assert line in script
    assert not any(line.startswith("#SBATCH --error") for line in script)  # one log per job
    assert {name: entry["job"] for name, entry in record(runs).items()} == {"bigram_s1337": "42_0", "gpt_s1337": "42_1"}
    submission = DelayedSubmission.load(runs / "slurm" / "42_1_submitted.pkl")
    command, cwd, log, resume, threads = submission.args
    assert submission.function is slurm.run_training
    assert command[:2] == [sys.executable, str(ROOT / "gpt.py")]
    assert "--device cuda" in " ".join(command) and "--dtype bfloat16" in " ".join(command)  # planned for the node
    assert (cwd, log, resume, threads) == (str(in_tmp_path), str(Path("runs") / "gpt_s1337" / "train.log"), False,
                                           8)
    assert not (runs / "gpt_s1337").exists()

    slurm_says("RUNNING")
    assert compare_main(*args) == 130
    captured = capsys.readouterr()
    assert captured.out.startswith("bigram_s1337: waiting for job 42_0, training in runs/bigram_s1337\n"
                                   "gpt_s1337: waiting for job 42_1, training in runs/gpt_s1337\n")
    assert re.search(r"^gpt_s1337 +training ", captured.out, re.MULTILINE), captured.out
    assert captured.err.endswith(stop)
    assert (slurm_commands / "submissions").read_text() == "1\n"
    jobs = json.loads((runs / "slurm" / "jobs.json").read_text())
    for entry in jobs.values():  # as compare.py wrote them before it recorded the text's SHA-256
        assert entry["expected"].pop("data_sha256") == hashlib.sha256(tiny_text_file.read_bytes()).hexdigest()
    (runs / "slurm" / "jobs.json").write_text(json.dumps(jobs))
    assert compare_main(*args) == 130
    assert capsys.readouterr().out.startswith("bigram_s1337: waiting for job 42_0, training in runs/bigram_s1337\n")

    assert compare_main(*args, "--n_embd", "8") == 2
    assert capsys.readouterr().err == ("error: job 42_1 (running) trains runs/gpt_s1337 with other settings; wait for "
                                       "it to end or cancel it with scancel 42_1\n")

    slurm_says("TIMEOUT")  # the jobs submitted from now on too: they end without a result
    monkeypatch.setattr(slurm, "follow", real_follow)
    assert compare_main(*args) == 1
    err = capsys.readouterr().err
    assert (slurm_commands / "submissions").read_text() == "2\n"
    for name, job in (("bigram_s1337", "43_0"), ("gpt_s1337", "43_1")):
        assert (f"error: {name} failed: job {job} ended TIMEOUT without a result (its log: "
                f"{runs}/slurm/{job}_0_log.out)\n") in err
    assert err.endswith("error: training failed for bigram_s1337, gpt_s1337 (see the errors above); run compare.py "
                        "again to retry them: finished runs are reused\n")


def test_jobs_that_sbatch_refuses_end_in_its_first_line(slurm_commands, in_tmp_path, tiny_text_file, capsys):
    pytest.importorskip("submitit")
    assert compare_main("--models", "bigram,gpt", "--launcher", "slurm", "--slurm_partition", "nopart") == 2
    assert capsys.readouterr().err == ("error: the jobs could not be submitted: sbatch: error: invalid partition "
                                       "specified: nopart; check --slurm_partition, --slurm_time and --slurm_args\n")
    assert not (slurm_commands / "submissions").exists()
    assert not (in_tmp_path / "runs").exists()  # nor submitit's files for the jobs, nor their folder

    (in_tmp_path / "runs" / "slurm").mkdir(parents=True)
    (in_tmp_path / "runs" / "slurm" / "mine.txt").write_text("kept")
    assert compare_main("--models", "bigram,gpt", "--launcher", "slurm", "--slurm_partition", "nopart") == 2
    assert [p.name for p in (in_tmp_path / "runs").rglob("*")] == ["slurm", "mine.txt"]


@pytest.mark.parametrize("missing", ["submitit", "sbatch"])
def test_without_submitit_or_sbatch_nothing_is_submitted_or_written(missing, in_tmp_path, tiny_text_file,
                                                                    monkeypatch, capsys):
    if missing == "submitit":
        monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit fails
        message = ("error: --launcher slurm needs the submitit package, which cannot be imported (import of submitit "
                   "halted; None in sys.modules); install it with pip install submitit, or drop --launcher slurm\n")
    else:
        monkeypatch.setitem(sys.modules, "submitit", types.ModuleType("submitit"))  # whether installed or not
        monkeypatch.setenv("PATH", str(in_tmp_path / "no-such-folder"))
        message = ("error: --launcher slurm needs SLURM's sbatch and srun, not found on the PATH; run compare.py on a "
                   "login node of the cluster, or drop --launcher slurm to train here\n")
    assert compare_main("--models", "bigram,gpt", "--launcher", "slurm") == 2
    assert capsys.readouterr().err == message
    assert list(in_tmp_path.iterdir()) == [in_tmp_path / "tiny.txt"]


@pytest.mark.parametrize("args,message", [
    (["--slurm_partition", "gpu"], "error: --slurm_partition is an option of the SLURM jobs; add --launcher slurm or "
                                   "drop --slurm_partition"),
    (["--launcher", "slurm", "--jobs", "2"], "error: --jobs trains several runs at once on this machine; with "
                                             "--launcher slurm every run is a job of its own: drop --jobs"),
    (["--launcher", "slurm", "--slurm_time", "4h"], "error: --slurm_time '4h' is not a SLURM time; write minutes, "
                                                    "H:MM:SS or D-HH:MM, as in 90, 4:00:00 or 1-12:00"),
    (["--launcher", "slurm", "--slurm_time", "0:00"], "error: --slurm_time '0:00' is no time at all"),
    (["--launcher", "slurm", "--slurm_gpus", "-1"], "error: --slurm_gpus must be zero or more, got -1"),
    (["--launcher", "slurm", "--slurm_cpus", "0"], "error: --slurm_cpus must be a positive integer, got 0"),
    (["--launcher", "slurm", "--slurm_args", "account"], "error: --slurm_args takes KEY=VALUE pairs separated by "
                                                         "commas, as in account=abc,constraint=a100; got 'account'"),
    (["--launcher", "slurm", "--slurm_args", "account=a,time=5"], "error: --slurm_args time is set by compare.py's "
                                                                  "--slurm_time; use that"),
    (["--launcher", "slurm", "--slurm_args", "output=x.log"], "error: --slurm_args output is set by compare.py "
                                                              "itself"),
])
def test_bad_slurm_flags_give_one_line_and_write_nothing(args, message, slurm_commands, in_tmp_path, tiny_text_file,
                                                         monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", types.ModuleType("submitit"))  # whether installed or not
    assert compare_main("--models", "bigram", *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(message), err
    assert list(in_tmp_path.iterdir()) == [in_tmp_path / "tiny.txt"]


@pytest.mark.parametrize("text,minutes", [("90", 90), ("5:30", 6), ("4:00:00", 240), ("1-12", 2160),
                                          ("1-12:30", 2190), ("2-0:0:30", 2881)])
def test_slurm_times_in_minutes(text, minutes):
    assert slurm.minutes(text) == minutes


def test_the_time_limits_warning_reaches_the_training_as_sigterm(tmp_path):
    training = ("import os, signal, sys, time\n"
                "signal.signal(signal.SIGTERM, lambda *a: (print('stopped with a checkpoint'), sys.exit(143)))\n"
                "print('threads', os.environ['OMP_NUM_THREADS'], flush=True)\n"
                "open('started', 'w').close()\n"
                "time.sleep(60)\n")
    job = (f"import sys; from gnngpt.processes import run_training\n"
           f"sys.exit(run_training({[sys.executable, '-c', training]!r}, {str(tmp_path)!r}, 'train.log', False, 3))")
    process = subprocess.Popen([sys.executable, "-c", job], env={**os.environ, "PYTHONPATH": str(ROOT)},
                               start_new_session=True)
    deadline = time.time() + 60
    while not (tmp_path / "started").exists():
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGUSR2)  # as SLURM may signal every process of the job
    assert process.wait(timeout=60) == 143
    log = (tmp_path / "train.log").read_text()
    assert log.startswith(f"$ {sys.executable} -c ") and log.endswith("threads 3\nstopped with a checkpoint\n")
