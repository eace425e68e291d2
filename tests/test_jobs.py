"""gnngpt.jobs (compare.py --jobs) with stand-in children: small Python programs that start in milliseconds."""
import io
import os
import signal
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from gnngpt import jobs
from gnngpt.jobs import Job, StatusBoard, child_threads, least_loaded, run_jobs, visible_gpus

COUNT_SIGINTS = """
import signal, sys, time
received = []
signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
open("started", "w").close()
deadline = time.time() + 20
while len(received) < 2 and time.time() < deadline:
    if received:
        open("stopping", "w").close()
    time.sleep(0.01)
open("signals", "w").write(str(len(received)))
sys.exit(130)
"""


def job(tmp_path, name, program, **fields):
    """A job whose child runs program (Python source) in its own directory tmp_path/name."""
    out_dir = tmp_path / name
    return Job(name, [sys.executable, "-c", f"import os; os.chdir({str(out_dir)!r})\n{program}"], out_dir, 4,
               **fields)


def wait_for(*paths, timeout=60):
    deadline = time.time() + timeout
    while not all(path.exists() for path in paths):
        assert time.time() < deadline, f"no {paths}"
        time.sleep(0.02)


def test_each_signal_reaches_each_running_child_once_and_no_queued_job_starts(tmp_path, capsys):
    jobs = [job(tmp_path, name, COUNT_SIGINTS) for name in ("a", "b", "c")]
    sessions = []

    def press_ctrl_c_twice():
        wait_for(tmp_path / "a" / "started", tmp_path / "b" / "started")
        sessions.extend(os.getsid(j.process.pid) for j in jobs[:2])
        os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C at the terminal reaches compare.py
        wait_for(tmp_path / "a" / "stopping", tmp_path / "b" / "stopping")
        os.kill(os.getpid(), signal.SIGINT)

    helper = threading.Thread(target=press_ctrl_c_twice)
    helper.start()
    assert run_jobs(jobs, at_once=2) == 130
    helper.join()
    assert [(tmp_path / name / "signals").read_text() for name in ("a", "b")] == ["2", "2"]
    assert sessions == [jobs[0].process.pid, jobs[1].process.pid]  # sessions of their own: no Ctrl-C of their own
    assert [j.state for j in jobs] == ["stopped", "stopped", "not started"]
    assert not (tmp_path / "c").exists()
    err = capsys.readouterr().err
    assert "SIGINT: every run stops after its current step with a checkpoint" in err
    assert "SIGINT: passed on to the runs still going" in err


def test_a_failed_job_is_reported_with_the_end_of_its_log_and_the_next_one_starts(tmp_path, capsys):
    failing = job(tmp_path, "failing", 'import sys; print("loading"); sys.exit("error: no such layer")')
    rows = "step,train_loss,val_loss,elapsed_s,tokens_per_s\\n0,4.2,4.3,0.1,\\n4,2.5,2.6123,0.5,1234.5\\n"
    training = job(tmp_path, "training", f'open("metrics.csv", "w").write("{rows}")')
    assert run_jobs([failing, training], at_once=1) == 0
    assert (failing.state, failing.exit_code, training.state) == ("failed", 1, "done")
    assert training.started >= failing.ended  # one at a time
    captured = capsys.readouterr()
    assert captured.err == (f"error: failing failed: no such layer (exit code 1; its output is in "
                            f"{tmp_path / 'failing' / 'train.log'})\n")
    assert "\ntraining  done         step 4/4  val loss 2.6123  1,234 tokens/s  " in captured.out
    assert (tmp_path / "failing" / "train.log").read_text().startswith(f"$ {sys.executable} -c ")


def test_a_job_whose_directory_is_removed_fails_alone_and_the_others_go_on(tmp_path, capsys):
    removed = job(tmp_path, "removed", 'import shutil, sys; shutil.rmtree(os.getcwd()); sys.exit(1)')
    other = job(tmp_path, "other", 'import time; time.sleep(0.5); open("finished", "w").close()')
    assert run_jobs([removed, other], at_once=2) == 0
    assert (removed.state, other.state) == ("failed", "done") and (tmp_path / "other" / "finished").exists()
    assert capsys.readouterr().err == (f"error: removed failed: its log cannot be read (No such file or directory) "
                                       f"(exit code 1; its output is in {tmp_path / 'removed' / 'train.log'})\n")


def test_when_starting_a_job_fails_the_running_ones_are_stopped_before_the_error_goes_on(tmp_path):
    running = job(tmp_path, "running", "import time; time.sleep(60)")
    missing = Job("missing", [str(tmp_path / "no-such-program")], tmp_path / "missing", 4)
    with pytest.raises(FileNotFoundError):
        run_jobs([running, missing], at_once=2)
    assert running.process.returncode == -signal.SIGTERM


def test_with_several_gpus_each_job_gets_the_least_loaded_one(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_gpus() == ["3", "5"]
    assert least_loaded(["3", "5"], [SimpleNamespace(gpu="3")]) == "5"
    assert least_loaded(["3", "5"], [SimpleNamespace(gpu="3"), SimpleNamespace(gpu="5")]) == "3"
    jobs = [job(tmp_path, name, 'import os; print("GPU", os.environ["CUDA_VISIBLE_DEVICES"])', device="cuda")
            for name in ("a", "b", "c")]
    assert run_jobs(jobs, at_once=2) == 0
    gpus = [(tmp_path / name / "train.log").read_text().splitlines()[-1] for name in ("a", "b", "c")]
    assert gpus[:2] == ["GPU 3", "GPU 5"] and gpus[2] in gpus[:2]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert visible_gpus() == []  # one GPU: every job shares it, CUDA_VISIBLE_DEVICES left alone


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_status_lines_are_redrawn_in_place(tmp_path):
    jobs = [job(tmp_path, name, "") for name in ("bigram", "GATv2Conv")]
    terminal = Terminal()
    board = StatusBoard(jobs, terminal)
    board.refresh()
    jobs[0].state = "training"
    board.refresh()
    assert terminal.getvalue() == ("bigram     queued\nGATv2Conv  queued\n"
                                   "\x1b[2F\x1b[J"  # up two lines, cleared
                                   "bigram     training\nGATv2Conv  queued\n")


def test_trainings_at_once_share_the_cores_unless_omp_num_threads_says_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(jobs, "cpu_cores", lambda: 8)  # this machine's cores might give every share one thread
    assert [child_threads(together) for together in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert child_threads(2) == 3


@pytest.mark.parametrize("planned,threads", [(None, "8"), (2, "4"), (6, "4")])
def test_a_job_left_of_a_comparison_trains_on_the_share_of_the_cores_its_planned_runs_give(planned, threads, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(jobs, "cpu_cores", lambda: 8)
    left = job(tmp_path, "a", 'import os; print("threads", os.environ["OMP_NUM_THREADS"])')
    assert run_jobs([left], at_once=2, planned=planned) == 0  # --jobs 2, one run left of `planned`
    assert (tmp_path / "a" / "train.log").read_text().splitlines()[-1] == f"threads {threads}"
