import errno
import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import pytest
import torch

from gnngpt import data
from gnngpt.data import PINNED_BATCHES, BatchSampler, CharTokenizer, download, load_text, read_prompt, split
from gnngpt.errors import UsageError

PAYLOAD = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200).encode()


@pytest.fixture
def server():
    """A local HTTP server on 127.0.0.1 that serves PAYLOAD at /input.txt."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/input.txt":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_download_writes_verified_file(server, tmp_path):
    dest = tmp_path / "input.txt"
    download(f"{server}/input.txt", dest, hashlib.sha256(PAYLOAD).hexdigest())
    assert dest.read_bytes() == PAYLOAD
    assert list(tmp_path.iterdir()) == [dest]


def test_download_onto_a_full_disk_says_so_and_leaves_nothing(server, tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("gnngpt.files.os.fsync", full)
    dest = tmp_path / "input.txt"
    with pytest.raises(UsageError) as e:
        download(f"{server}/input.txt", dest, hashlib.sha256(PAYLOAD).hexdigest())
    assert str(e.value) == (f"could not write {dest} (No space left on device); free disk space or pass --data PATH "
                            f"to a local copy")
    assert list(tmp_path.iterdir()) == []


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path):
    dest = tmp_path / "input.txt"
    url = f"{server}/input.txt"
    with pytest.raises(UsageError, match="checksum mismatch") as e:
        download(url, dest, "0" * 64)
    assert url in str(e.value) and "--data" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_download_server_down_leaves_nothing(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "input.txt"
    url = f"http://127.0.0.1:{port}/input.txt"
    with pytest.raises(UsageError, match="could not download") as e:
        download(url, dest, "0" * 64, timeout=5)
    assert url in str(e.value) and "--data" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_download_missing_file_on_server_leaves_nothing(server, tmp_path):
    with pytest.raises(UsageError, match="404"):
        download(f"{server}/nope.txt", tmp_path / "input.txt", "0" * 64)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content,message", [
    (None, "data file {path} does not exist; pass --data PATH to a UTF-8 text file"),
    ("fifo", "data file {path} is not a regular file (a device or a pipe); pass --data PATH to a UTF-8 text file"),
    ("dir", "data file {path} is a directory; pass --data PATH to a UTF-8 text file in it"),
    (b"", "data file {path} is empty; pass --data PATH to a non-empty UTF-8 text file"),
    (b"caf\xe9 au lait", "data file {path} is not UTF-8 text (byte 3); convert it to UTF-8 or pass another --data"),
])
def test_load_text_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "data.txt"
    if content == "dir":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError) as e:
        load_text(path)
    assert str(e.value) == message.format(path=path)


def test_an_unreadable_data_file_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "data.txt"
    path.write_text("text")

    def refuse(self):  # as a file without read permission does for a user other than root
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(UsageError) as e:
        load_text(path)
    assert str(e.value) == f"cannot read data file {path} (Permission denied); make it readable or pass another --data"


def test_tokenizer_round_trip_and_split():
    text = "hello world\n"
    tok = CharTokenizer.from_text(text)
    assert tok.chars == sorted(set(text))
    assert tok.decode(tok.encode(text)) == text
    train, val = split(torch.arange(100))
    assert len(train) == 90 and torch.equal(val, torch.arange(90, 100))


def test_batches_are_shifted_windows_and_seeded():
    data = torch.arange(1000)
    a = BatchSampler(data[:900], data[900:], block_size=8, batch_size=4, device="cpu", seed=1)
    b = BatchSampler(data[:900], data[900:], block_size=8, batch_size=4, device="cpu", seed=1)
    x, y = a.get("train")
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y, x + 1)
    assert torch.equal(x, b.get("train")[0])
    xv, _ = a.get("val")
    assert xv.min() >= 900


def test_batches_on_cuda_come_through_pinned_memory_and_equal_those_on_the_cpu(device):
    if device.type != "cuda":
        pytest.skip("batches are pinned on CUDA alone: python -m pytest --device cuda runs this test")
    data = torch.arange(1000)
    on_device = BatchSampler(data[:900], data[900:], block_size=8, batch_size=4, device=device, seed=1)
    on_cpu = BatchSampler(data[:900], data[900:], block_size=8, batch_size=4, device="cpu", seed=1)
    assert on_device.pin
    for part in ("train", "val", "train"):
        for a, b in zip(on_device.get(part), on_cpu.get(part)):
            assert a.is_cuda and torch.equal(a.cpu(), b)
    assert PINNED_BATCHES.on  # no fallback


def test_batches_that_cannot_be_pinned_are_copied_from_ordinary_memory(monkeypatch, capsys, with_fallbacks):
    pins = []

    def failing_pin_memory(tensor):
        pins.append(tensor)
        raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")

    monkeypatch.setattr(torch.Tensor, "pin_memory", failing_pin_memory)
    monkeypatch.setattr(PINNED_BATCHES, "on", True)
    data = torch.arange(1000)
    pinned = BatchSampler(data[:900], data[900:], block_size=8, batch_size=4, device="cpu", seed=1)
    plain = BatchSampler(data[:900], data[900:], block_size=8, batch_size=4, device="cpu", seed=1)
    assert not pinned.pin
    pinned.pin = True  # as on CUDA
    for part in ("train", "val", "train"):
        for a, b in zip(pinned.get(part), plain.get(part)):
            assert torch.equal(a, b)
    assert len(pins) == 1 and not PINNED_BATCHES.on  # tried once
    assert capsys.readouterr().err == (
        "warning: copying a batch to the GPU through pinned memory failed (RuntimeError: CUDA error: out of memory); "
        "batches are copied from ordinary memory (the same batches) from now on\n")


def test_batches_are_drawn_from_every_window_of_each_split_and_no_other():
    data = torch.arange(100)
    sampler = BatchSampler(data[:90], data[90:], block_size=8, batch_size=64, device="cpu", seed=1)
    for part, start, end in (("train", 0, 90), ("val", 90, 100)):
        starts = {int(x[0]) for _ in range(20) for x in sampler.get(part)[0]}
        assert starts == set(range(start, end - 8))  # the windows of 8 + 1 tokens inside the split, each drawn


def test_block_size_longer_than_a_split_is_refused_with_the_sizes_of_both():
    data = torch.arange(100)
    sampler = BatchSampler(data[:90], data[90:], block_size=9, batch_size=2, device="cpu", seed=1)  # 10 tokens: 9 + 1
    x, y = sampler.get("val")  # the one window the split holds
    assert torch.equal(x, data[90:99].repeat(2, 1)) and torch.equal(y, data[91:100].repeat(2, 1))
    with pytest.raises(UsageError) as e:
        BatchSampler(data[:90], data[90:], block_size=10, batch_size=2, device="cpu", seed=1)
    assert str(e.value) == ("--data has too little text for block_size 10: 100 token(s), 90 for training and 10 for "
                            "validation, where each split needs at least block_size + 1; use a smaller --block_size "
                            "or a longer --data text")


def test_missing_default_file_is_downloaded(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("gnngpt.data.DATA_URL", f"{server}/input.txt")
    monkeypatch.setattr("gnngpt.data.DATA_SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    assert load_text() == PAYLOAD.decode()
    assert (tmp_path / "input.txt").read_bytes() == PAYLOAD


def test_a_prompt_file_is_read_from_a_pipe_and_refused_past_its_size_limit(tmp_path, monkeypatch):
    fifo = tmp_path / "prompt"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("ROMEO:"))
    writer.start()
    assert read_prompt(f"FILE:{fifo}") == "ROMEO:"
    writer.join()
    monkeypatch.setattr(data, "MAX_PROMPT_BYTES", 5)
    (tmp_path / "long.txt").write_text("ROMEO:")
    with pytest.raises(UsageError) as e:
        read_prompt(f"FILE:{tmp_path / 'long.txt'}")
    assert str(e.value) == (f"the prompt file {tmp_path / 'long.txt'} holds more than 5 bytes; give --prompt "
                            f"FILE:PATH to a shorter UTF-8 text file")
    (tmp_path / "five.txt").write_text("ROMEO")
    assert read_prompt(f"FILE:{tmp_path / 'five.txt'}") == "ROMEO"  # at the limit
