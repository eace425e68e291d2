"""One training per run directory, and run directories that cannot serve: refused with one line, nothing lost."""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import compare
import evaluate
import sample
from conftest import TINY_GPT_RUN, train_tiny_gpt
from gnngpt import checkpoint as ckpt_module, evaluation, rundir
from gnngpt.checkpoint import load_checkpoint
from gnngpt.rundir import hold_run_dir, read_metrics, start_run_dir

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("in_tmp_path")


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in Path(directory).rglob("*") if p.is_file()}


def error_line(capsys):
    """The one line a refusal printed to stderr, after checking that it is one line and says error."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_a_second_process_is_refused_while_a_training_runs_and_a_killed_one_blocks_nothing(tiny_text_file,
                                                                                           tmp_path, capsys):
    out = tmp_path / "runs" / "gpt_s1337"  # where compare.py keeps gpt with seed 1337
    args = ["--data", str(tiny_text_file), "--out_dir", str(out), *TINY_GPT_RUN, "--max_iters", "1000000",
            "--eval_interval", "20"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, str(ROOT / "gpt.py"), *args], cwd=tmp_path, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        for line in first.stdout:
            if line.startswith("step 20:"):  # the checkpoint of step 0 is written, training goes on
                break
        assert first.poll() is None
        held = f"error: {out} is in use by a training in process {first.pid}; "

        config = (out / "config.json").read_bytes()
        for second in (["--resume"], ["--overwrite"]):  # this process is the second
            assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "20", "--eval_interval", "20", *second) == 2
            assert error_line(capsys) == held + "wait for it to end or choose another --out_dir\n"
        assert (out / "config.json").read_bytes() == config and (out / "ckpt.pt").is_file()

        assert sample.main(["--out_dir", str(out), "--device", "cpu"]) == 2
        assert error_line(capsys) == held + "try again once that training has ended\n"
        assert compare.main(["--data", str(tiny_text_file), "--runs", str(out.parent), "--models", "gpt",
                             "--device", "cpu"]) == 2
        assert error_line(capsys) == held + "wait for it to end or pass --runs DIR to compare elsewhere\n"
        assert first.poll() is None
    finally:
        first.kill()  # SIGKILL: no handler runs, the lock file stays behind
        first.wait()
    assert first.returncode == -signal.SIGKILL
    assert (out / ".lock").read_text() == f"{first.pid}\n"

    step = load_checkpoint(out / "ckpt.pt")["step"]
    assert train_tiny_gpt(out, tiny_text_file, "--max_iters", str(step + 1), "--eval_interval", "20", "--resume") == 0
    assert read_metrics(out)[-1]["step"] == step + 1
    assert (out / ".lock").read_text() == f"{os.getpid()}\n"


def test_a_refused_training_writes_nothing(tiny_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "2", "--eval_interval", "1") == 0
    capsys.readouterr()
    with hold_run_dir(out):  # as a training in another process would
        before = snapshot(out)
        for args in ([], ["--overwrite"], ["--resume", "--max_iters", "4"]):
            assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "2", "--eval_interval", "1", *args) == 2
            assert error_line(capsys).startswith(f"error: {out} is in use by a training in process {os.getpid()}; ")
        assert snapshot(out) == before
    assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "4", "--eval_interval", "1", "--resume") == 0


@pytest.mark.parametrize("out", ["plots", "plots/study", "plots/study/runs", "plots/study/model_outputs",
                                 "model_outputs", "model_outputs/mine"])
def test_a_training_is_refused_in_a_folder_of_what_the_repository_ships(out, tiny_text_file, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(rundir, "SHIPPED_REPORTS", tmp_path / "plots")  # as if this were the repository's
    monkeypatch.setattr(rundir, "SHIPPED_SAMPLES", tmp_path / "model_outputs")
    (tmp_path / "plots" / "study" / "runs" / "gpt_s1337").mkdir(parents=True)
    (tmp_path / "plots" / "study" / "runs" / "gpt_s1337" / "config.json").write_text("{}")
    (tmp_path / "plots" / "study" / "results.md").write_text("# Results\n")
    (tmp_path / "plots" / "study" / "model_outputs").mkdir()
    (tmp_path / "model_outputs").mkdir()
    before = snapshot(tmp_path)
    for args in ([], ["--overwrite"]):
        assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "2", *args) == 2
        assert error_line(capsys) == (f"error: {out} is a folder where this repository keeps reports, samples or runs "
                                      f"that it ships, not a run directory; choose another --out_dir\n")
    assert snapshot(tmp_path) == before and not (tmp_path / "model_outputs" / "mine").exists()


def test_a_new_run_directory_in_plots_trains(tiny_text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "SHIPPED_REPORTS", tmp_path / "plots")  # as if this were the repository's
    (tmp_path / "plots" / "study" / "runs" / "gpt_s1337").mkdir(parents=True)
    (tmp_path / "plots" / "study" / "runs" / "gpt_s1337" / "train.log").write_text("")  # as compare.py starts one
    assert train_tiny_gpt("plots/study/runs/gpt_s1337", tiny_text_file, "--max_iters", "2") == 0


def test_a_run_refused_in_a_directory_without_a_lock_file_leaves_none(tiny_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "2", "--eval_interval", "1") == 0
    (out / ".lock").unlink()  # as the small files of a committed run are kept
    before = snapshot(out)
    capsys.readouterr()
    for args in ([], ["--resume"], ["--resume", "--n_embd", "8"]):  # finished; finished; another configuration
        assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "2", "--eval_interval", "1", *args) == 2
        assert error_line(capsys).startswith("error: ")
        assert snapshot(out) == before


@pytest.mark.parametrize("args", [[], ["--resume"]], ids=["new", "resume"])
@pytest.mark.parametrize("under", [False, True], ids=["the file", "under the file"])
def test_out_dir_that_is_a_file_or_lies_under_one_is_refused(args, under, tiny_text_file, tmp_path, capsys):
    before = snapshot(tmp_path)
    out = tiny_text_file / "run" if under else tiny_text_file
    where = f"lies under {tiny_text_file}, a file" if under else "is a file"
    assert train_tiny_gpt(out, tiny_text_file, *args) == 2
    assert error_line(capsys) == f"error: --out_dir {out} {where}, not a directory; choose another --out_dir\n"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flag", ["--runs", "--out"])
def test_compare_refuses_a_file_as_its_runs_or_plots_directory(flag, tiny_text_file, tmp_path, capsys):
    before = snapshot(tmp_path)
    assert compare.main(["--models", "bigram", "--data", str(tiny_text_file), flag, str(tiny_text_file)]) == 2
    assert error_line(capsys) == f"error: {flag} {tiny_text_file} is a file, not a directory; choose another {flag}\n"
    assert snapshot(tmp_path) == before


def test_sample_refuses_a_file_as_its_run_directory(tiny_text_file, capsys):
    assert sample.main(["--out_dir", str(tiny_text_file), "--device", "cpu"]) == 2
    assert error_line(capsys) == (f"error: --out_dir {tiny_text_file} is a file, not a directory; choose another "
                                  f"--out_dir\n")


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A directory whose entries cannot be created or removed: mode 0o555, and for root (whom modes do not stop)
    os.open and os.mkdir refuse new entries there as the kernel refuses them to anyone else."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    if os.geteuid() == 0:
        real_open, real_mkdir = os.open, os.mkdir

        def refused(path):
            return os.path.dirname(os.path.abspath(path)) == str(directory) and not os.path.exists(path)

        def open_(path, flags, mode=0o777, *, dir_fd=None):
            if flags & os.O_CREAT and refused(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, mode, dir_fd=dir_fd)

        def mkdir(path, mode=0o777, *, dir_fd=None):
            if refused(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, mode, dir_fd=dir_fd)

        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "mkdir", mkdir)
    yield directory
    directory.chmod(0o755)


@pytest.mark.parametrize("where,message", [
    ("{dir}", "error: cannot write to --out_dir {out} (Permission denied); make it writable or choose another "
              "--out_dir\n"),
    ("{dir}/run", "error: cannot create --out_dir {out} (Permission denied); choose another --out_dir\n"),
], ids=["unwritable", "inside an unwritable one"])
def test_unwritable_out_dir_is_refused(where, message, read_only_dir, tiny_text_file, capsys):
    out = Path(where.format(dir=read_only_dir))
    assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "2") == 2
    assert error_line(capsys) == message.format(out=out)
    assert list(read_only_dir.iterdir()) == []


def test_a_run_directory_made_read_only_after_a_training_is_refused(read_only_dir, tiny_text_file, capsys):
    read_only_dir.chmod(0o755)
    (read_only_dir / ".lock").write_text("")  # left by an earlier training; the directory became read-only since
    read_only_dir.chmod(0o555)
    assert train_tiny_gpt(read_only_dir, tiny_text_file, "--max_iters", "2") == 2
    assert error_line(capsys) == (f"error: cannot write to --out_dir {read_only_dir} (Permission denied); make it "
                                  f"writable or choose another --out_dir\n")
    assert [p.name for p in read_only_dir.iterdir()] == [".lock"]


def disk_full_from_call(n, real, code=errno.ENOSPC):
    """real, except that its n-th call and every later one raise ENOSPC, as a disk that fills and stays full
    would (or another errno code)."""
    calls = 0

    def write(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls >= n:
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    return write


def writes_failing_from(n, code=errno.ENOSPC):
    """A stand-in for files.utf8 whose writes fail from the n-th on (see disk_full_from_call)."""
    write = disk_full_from_call(n, lambda f, data: f.write(data), code)
    return lambda text: lambda f: write(f, text.encode("utf-8"))


@pytest.mark.parametrize("fails", ["ckpt.pt", "ckpt.pt, read-only", "metrics.csv"])
def test_a_full_disk_during_training_keeps_the_last_checkpoint(fails, tiny_text_file, tmp_path, monkeypatch,
                                                               capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        if fails.startswith("ckpt.pt"):  # the second checkpoint, at step 2
            code = errno.EROFS if fails.endswith("read-only") else errno.ENOSPC
            mp.setattr(ckpt_module.torch, "save", disk_full_from_call(2, ckpt_module.torch.save, code))
            fix = "make the run directory writable" if code == errno.EROFS else "free disk space"
            message = (f"could not write {out / 'ckpt.pt'} ({os.strerror(code)}); the previous checkpoint is "
                       f"unchanged; {fix} or choose another --out_dir, then --resume")
        else:  # the second row of metrics.csv, at step 2: opening the file to append it
            real_open = Path.open
            append = disk_full_from_call(2, real_open)
            mp.setattr(Path, "open", lambda path, mode="r", *a, **k: (
                append if path.name == "metrics.csv" and mode == "a" else real_open)(path, mode, *a, **k))
            message = (f"could not write {out / 'metrics.csv'} (No space left on device); free disk space or "
                       f"choose another --out_dir, then --resume from the last checkpoint")
        assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "4", "--eval_interval", "2") == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {message}"  # after the progress bar
    assert load_checkpoint(out / "ckpt.pt")["step"] == 0
    assert [p.name for p in out.iterdir() if p.name.startswith(".ckpt")] == []

    assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "4", "--eval_interval", "2", "--resume") == 0
    assert [row["step"] for row in read_metrics(out)] == [0, 2, 4]
    assert json.loads((out / "config.json").read_text())["settings"]["max_iters"] == 4


@pytest.mark.parametrize("fails", ["ckpt.pt", "metrics.csv"])
def test_a_full_disk_before_the_first_checkpoint_says_to_train_again(fails, tiny_text_file, tmp_path, monkeypatch,
                                                                     capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        if fails == "ckpt.pt":
            mp.setattr(ckpt_module.torch, "save", disk_full_from_call(1, ckpt_module.torch.save))
        else:  # the row of step 0
            real_open = Path.open
            append = disk_full_from_call(1, real_open)
            mp.setattr(Path, "open", lambda path, mode="r", *a, **k: (
                append if path.name == "metrics.csv" and mode == "a" else real_open)(path, mode, *a, **k))
        assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "4", "--eval_interval", "2") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: could not write {out / fails} (No space left on "
                                                        f"device); free disk space or choose another --out_dir, then "
                                                        f"train again")
    assert not out.exists()  # nothing trained: the run leaves nothing
    assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "4", "--eval_interval", "2") == 0


def test_a_full_disk_at_the_exact_evaluation_is_one_line_and_resume_finishes_the_run(tiny_text_file, tmp_path,
                                                                                    monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(evaluation, "utf8", writes_failing_from(2))  # the second of loss_by_position.csv, eval.json
        assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "2", "--eval_interval", "2") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: could not write {out / 'eval.json'} (No space left "
                                                        f"on device); free disk space, then finish the run with "
                                                        f"--resume")
    assert not any((out / name).exists() for name in ("eval.json", "loss_by_position.csv", "sample.txt"))
    assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "2", "--eval_interval", "2", "--resume") == 0
    assert all((out / name).is_file() for name in ("eval.json", "loss_by_position.csv", "sample.txt"))


def test_evaluate_write_to_a_run_directory_it_cannot_write_is_one_line_and_changes_nothing(tiny_text_file, tmp_path,
                                                                                          monkeypatch, capsys):
    out = tmp_path / "run"
    assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "2", "--eval_interval", "2") == 0
    (out / "loss_by_position.csv").write_bytes(b"\xff\xfe")  # unlike the one --write computes, and not even text
    before = snapshot(out)
    capsys.readouterr()
    monkeypatch.setattr(evaluation, "utf8", writes_failing_from(2, errno.EACCES))
    assert evaluate.main(["--out_dir", str(out), "--write", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: could not write {out / 'eval.json'} (Permission "
                                                        f"denied); make the run directory writable")
    assert snapshot(out) == before


def test_evaluate_write_with_a_directory_in_the_place_of_eval_json_says_so_and_changes_nothing(tiny_text_file,
                                                                                                  tmp_path, capsys):
    out = tmp_path / "run"
    assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "2", "--eval_interval", "2") == 0
    (out / "eval.json").unlink()
    (out / "eval.json").mkdir()
    (out / "loss_by_position.csv").write_text("offset,loss,targets\n0,1.0,1\n")  # unlike the one --write computes
    before = snapshot(out)
    capsys.readouterr()
    assert evaluate.main(["--out_dir", str(out), "--write", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: could not write {out / 'eval.json'} (Is a "
                                                        f"directory); remove the directory in the file's place")
    assert snapshot(out) == before


def test_a_run_that_trains_again_keeps_no_exact_loss_or_sample_of_its_former_checkpoint(tiny_text_file, tmp_path):
    out = tmp_path / "run"
    assert train_tiny_gpt(out, tiny_text_file, "--max_iters", "2", "--eval_interval", "2") == 0
    assert (out / "eval.json").is_file() and (out / "sample.txt").is_file()
    config = json.loads((out / "config.json").read_text())
    start_run_dir(out, config)  # as --resume does, before training goes on
    assert not (out / "eval.json").exists() and not (out / "sample.txt").exists()
    assert (out / "ckpt.pt").is_file() and (out / "metrics.csv").is_file()


NOT_ROWS = ("has a row that is not finite numbers under its header, with step, train_loss, val_loss, elapsed_s filled "
            "and a whole step")


@pytest.mark.parametrize("damage,problem", [
    (lambda text: text + b"garbage,,,\n", NOT_ROWS),
    (lambda text: text + b"4,2.5\n", NOT_ROWS),  # a row short of cells
    (lambda text: text + b"4,2.5,nan,1.0,,1.0,48\n", NOT_ROWS),
    (lambda text: text + b"4.5,2.5,2.6,1.0,,1.0,48\n", NOT_ROWS),
    (lambda text: b"a,b\n" + text.split(b"\n", 1)[1], NOT_ROWS),  # a header without the columns
    (lambda text: text + b"1" * 200_000 + b"\n", "is not CSV (field larger than field limit (131072))"),
    (lambda text: text + b"\xff\xfe,,,\n", "is not UTF-8 text (byte {})"),
])
def test_a_metrics_csv_that_is_not_numbers_or_not_text_is_refused_in_one_line(damage, problem, tiny_text_file,
                                                                              tmp_path, capsys):
    out = tmp_path / "run"
    assert train_tiny_gpt(out, tiny_text_file) == 0
    metrics = out / "metrics.csv"
    start = metrics.stat().st_size
    metrics.write_bytes(damage(metrics.read_bytes()))
    before = snapshot(out)
    capsys.readouterr()
    assert train_tiny_gpt(out, tiny_text_file) == 2
    assert error_line(capsys) == f"error: {metrics} {problem.format(start)}; repair it or delete {out}\n"
    assert snapshot(out) == before


def test_a_last_row_cut_short_is_refused_and_once_deleted_resume_writes_it_again(tiny_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--max_iters", "4", "--eval_interval", "2"]
    assert train_tiny_gpt(out, tiny_text_file, *args) == 0
    metrics = (out / "metrics.csv").read_bytes()
    (out / "metrics.csv").write_bytes(metrics[:-5])  # as a full disk leaves it: the last evaluation's row unended
    before = snapshot(out)
    capsys.readouterr()
    assert train_tiny_gpt(out, tiny_text_file, *args, "--resume") == 2
    assert error_line(capsys) == (f"error: {out / 'metrics.csv'} ends in a row without its line end, as a full disk "
                                  f"or an editor leaves one; end the row if it is whole, else delete it and train on "
                                  f"from the checkpoint (--resume, or the comparison again)\n")
    assert snapshot(out) == before
    (out / "metrics.csv").write_bytes(metrics[:metrics.rstrip().rindex(b"\n") + 1])  # the row deleted
    assert train_tiny_gpt(out, tiny_text_file, *args) == 2
    assert error_line(capsys).startswith(f"error: {out} holds an unfinished run of this configuration; pass --resume")
    assert train_tiny_gpt(out, tiny_text_file, *args, "--resume") == 0
    assert (out / "metrics.csv").read_bytes() == metrics
