import builtins
import errno
import os
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch

from gnngpt import checkpoint as ckpt_module
from gnngpt.checkpoint import load_checkpoint, save_checkpoint
from gnngpt.cli import main
from gnngpt.config import BIGRAM
from gnngpt.errors import UsageError
from gnngpt.files import atomic_write, atomic_writes, utf8
from gnngpt.models import build_model


def bigram_checkpoint(seed=0):
    torch.manual_seed(seed)
    model = build_model("bigram", {"vocab_size": 3})
    return {"name": "bigram", "arch": "bigram", "model_config": {"vocab_size": 3}, "vocab": ["a", "b", "c"],
            "model": model.state_dict(), "step": seed}


def assert_same_checkpoint(loaded, expected):
    assert loaded["step"] == expected["step"]
    key = "token_embedding_table.weight"
    assert torch.equal(loaded["model"][key], expected["model"][key])


def test_checkpoint_round_trip(tmp_path):
    good = bigram_checkpoint()
    save_checkpoint(tmp_path / "ckpt.pt", good)
    assert_same_checkpoint(load_checkpoint(tmp_path / "ckpt.pt"), good)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    good = bigram_checkpoint()
    save_checkpoint(path, good)

    def half_written_then_disk_full(obj, f):
        f.write(b"PK\x03\x04 half of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_module.torch, "save", half_written_then_disk_full)
    with pytest.raises(UsageError, match="could not write .*No space left on device.*previous checkpoint is unchanged"):
        save_checkpoint(path, bigram_checkpoint(seed=1))
    assert_same_checkpoint(load_checkpoint(path), good)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # the temporary file is gone


def test_process_killed_during_write_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / "ckpt.pt"
    good = bigram_checkpoint()
    save_checkpoint(path, good)
    save_checkpoint(tmp_path / "newer.pt", bigram_checkpoint(seed=1))
    newer = (tmp_path / "newer.pt").read_bytes()

    def write_half_then_die(f):
        f.write(newer[: len(newer) // 2])
        f.flush()
        os._exit(9)  # the process dies in the middle of the write: no cleanup, no exception handlers

    pid = os.fork()
    if pid == 0:  # the child
        atomic_write(path, write_half_then_die)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.pt.")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == len(newer) // 2  # cut off midway
    assert_same_checkpoint(load_checkpoint(path), good)


class Payload:
    """Unpickling this object would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def malicious_zip(path, marker):
    torch.save({**bigram_checkpoint(), "extra": Payload(marker)}, path)


def malicious_pickle(path, marker):
    path.write_bytes(pickle.dumps({"arch": "bigram", "payload": Payload(marker)}))


@pytest.mark.parametrize("write", [malicious_zip, malicious_pickle])
def test_malicious_checkpoint_does_not_run_its_payload(write, tiny_text_file, tmp_path, capsys):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    write(out / "ckpt.pt", marker)
    with pytest.raises(UsageError, match="is not a readable checkpoint of this project"):
        load_checkpoint(out / "ckpt.pt")
    assert not marker.exists()

    assert main(BIGRAM, ["--data", str(tiny_text_file), "--out_dir", str(out), "--resume", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {out / 'ckpt.pt'} is not a readable checkpoint")
    assert not marker.exists()

    with open(out / "ckpt.pt", "rb") as f:  # the payload is live: an unrestricted unpickler runs it
        torch.load(f, weights_only=False) if write is malicious_zip else pickle.load(f)
    assert marker.exists()


def flip_byte_in_tensor_data(path):
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + 5] ^= 0xFF  # a byte of the tensor, past the local header
    path.write_bytes(bytes(raw))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BROKEN = [
    (flip_byte_in_tensor_data, "is corrupt (checksum mismatch in"),
    (truncate, "is not a readable checkpoint of this project (File is not a zip file)"),
    (lambda p: p.write_bytes(b""), "is not a readable checkpoint of this project"),
    (lambda p: p.write_text("hello"), "is not a readable checkpoint of this project"),
    (lambda p: torch.save([1, 2, 3], p), "is not a checkpoint of this project"),
    (lambda p: torch.save({**bigram_checkpoint(), "vocab": ["a", "b"]}, p), "is not a checkpoint of this project"),
    (lambda p: torch.save({**bigram_checkpoint(), "arch": "lstm"}, p), "is not a checkpoint of this project"),
    (lambda p: torch.save((lambda c: {**c, "model": {**c["model"], "extra": 1}})(bigram_checkpoint()), p),
     "is not a checkpoint of this project"),  # a weight that is no tensor
    (lambda p: torch.save((lambda c: {**c, "vocab": list(range(len(c["vocab"])))})(bigram_checkpoint()), p),
     "is not a checkpoint of this project"),  # characters that are no strings
    (lambda p: p.unlink(), "no checkpoint at"),
]


@pytest.mark.parametrize("damage,message", BROKEN, ids=[m for _, m in BROKEN])
def test_broken_checkpoint_gives_one_line_error(damage, message, tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, bigram_checkpoint())
    damage(path)
    with pytest.raises(UsageError) as e:
        load_checkpoint(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_atomic_write_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "figure.png").write_bytes(b"old")
    (tmp_path / "figure.png").symlink_to(tmp_path / "store" / "figure.png")
    atomic_write(tmp_path / "figure.png", lambda f: f.write(b"new"))
    assert (tmp_path / "figure.png").is_symlink()
    assert (tmp_path / "store" / "figure.png").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["figure.png", "figure.png", "store"]


def disk_full(f):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_atomic_write_removes_the_directories_it_made_and_keeps_the_others(tmp_path):
    (tmp_path / "kept").mkdir()
    x, y, z = tmp_path / "kept" / "a" / "b" / "x.txt", tmp_path / "kept" / "a" / "y.txt", tmp_path / "new" / "z.txt"
    with pytest.raises(OSError) as failed:
        atomic_writes([(x, utf8("x")), (y, utf8("y")), (z, disk_full)])
    assert failed.value.target == z
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == ["kept"]
    with pytest.raises(OSError, match="File name too long"):  # the deeper directory cannot be made
        atomic_writes([(tmp_path / "new" / ("x" * 300) / "f.txt", utf8("f"))])
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == ["kept"]
    atomic_writes([(x, utf8("x")), (z, utf8("z"))])
    assert x.read_text() == "x" and z.read_text() == "z"


@pytest.mark.parametrize("links", [True, False], ids=["hard links", "a file system without them"])
def test_a_rename_refused_partway_gives_the_renamed_paths_their_old_files_back(links, tmp_path, monkeypatch):
    a, b, c = (tmp_path / name for name in ("a.csv", "b.json", "c.txt"))
    a.write_text("old a")
    b.write_text("old b")
    replace = os.replace

    def refused_over_c(source, target):
        if Path(target) == c:  # as over an immutable file, or another user's in a sticky directory
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(target))
        return replace(source, target)

    def no_links(source, target):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(target))

    monkeypatch.setattr(os, "replace", refused_over_c)
    if not links:
        monkeypatch.setattr(os, "link", no_links)
    c.write_text("old c")
    with pytest.raises(PermissionError) as failed:
        atomic_writes([(a, utf8("new a")), (tmp_path / "new.txt", utf8("new")), (b, utf8("new b")), (c, utf8("c"))])
    assert failed.value.target == c
    expected = ["old a", "old b"] if links else ["new a", "new b"]  # without links, the new files stay
    assert [a.read_text(), b.read_text(), c.read_text()] == [*expected, "old c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.json", "c.txt"]  # nor new.txt, nor a link


def test_atomic_writes_leave_no_link_behind_for_a_path_given_twice_or_another_users_file(tmp_path, monkeypatch):
    target = tmp_path / "t.txt"
    target.write_text("old")
    (tmp_path / "l.txt").symlink_to(target)
    atomic_writes([(target, utf8("1")), (tmp_path / "l.txt", utf8("2")), (target, utf8("3"))])  # one file, 3 times
    assert target.read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["l.txt", "t.txt"]
    monkeypatch.setattr(os, "getuid", lambda: target.stat().st_uid + 1)  # the file is another user's
    monkeypatch.setattr(os, "link", None)  # no link is tried: in a sticky directory it could not be removed
    atomic_writes([(target, utf8("4"))])
    assert target.read_text() == "4"


def test_a_failed_atomic_write_keeps_a_directory_another_writer_made_meanwhile(tmp_path, monkeypatch):
    shared, mkdir = tmp_path / "shared", Path.mkdir

    def after_another_writer(self, *args, **kwargs):
        if self == shared and not self.exists():
            mkdir(self)  # another process makes it between this write's look and its own mkdir
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", after_another_writer)
    with pytest.raises(OSError):
        atomic_writes([(shared / "x.txt", disk_full)])
    assert shared.is_dir()  # the other writer's, about to put its own file in it


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.txt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
