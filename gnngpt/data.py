"""Tinyshakespeare download, the character tokenizer and prompts in its vocabulary, train/val split, random batches."""
import hashlib
import http.client
import urllib.error
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from .errors import UsageError, not_utf8
from .fallback import Acceleration
from .files import atomic_write, write_failure

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATA = "input.txt"
PINNED_BATCHES = Acceleration("copying a batch to the GPU through pinned memory",
                              "batches are copied from ordinary memory (the same batches)")


def download(url, dest, sha256, timeout=30.0, instead="pass --data PATH to a local copy"):
    """Download url to dest atomically (temporary file, checksum, rename); no partial file on failure. instead: what
    a failure's message offers besides trying again."""

    def write(f):
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {Path(dest).name}") as bar:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise UsageError(
                f"checksum mismatch for {url} (got sha256 {digest.hexdigest()}); "
                f"download the file yourself and {instead}"
            )

    try:
        atomic_write(dest, write)
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise UsageError(
            f"could not download {url} ({reason}); check the connection or {instead}"
        ) from None
    except OSError as e:  # writing it
        raise UsageError(f"{write_failure(dest, e, 'its directory')} or {instead}") from None
    return Path(dest)


def text_digest(text):
    """The SHA-256 of text's UTF-8 bytes, as hex: which text a run trained on, wherever its file lies now."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_text(path=None, instead="pass --data PATH to a local copy"):
    """Read the training text; the default file is downloaded when it is missing (instead: what a failed download's
    message offers besides trying again)."""
    if path is None:
        path = Path(DEFAULT_DATA)
        if not path.exists():
            download(DATA_URL, path, DATA_SHA256, instead=instead)
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"data file {path} is a directory; pass --data PATH to a UTF-8 text file in it")
    if not path.exists():
        raise UsageError(f"data file {path} does not exist; pass --data PATH to a UTF-8 text file")
    if not path.is_file():
        raise UsageError(f"data file {path} is not a regular file (a device or a pipe); pass --data PATH to a UTF-8 "
                         f"text file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read data file {path} ({e.strerror}); make it readable or pass another --data") \
            from None
    if not raw:
        raise UsageError(f"data file {path} is empty; pass --data PATH to a non-empty UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(f"data file {path}", e, "convert it to UTF-8 or pass another --data") from None


class CharTokenizer:
    """Maps each distinct character of a text to an integer, in sorted order."""

    def __init__(self, chars):
        self.chars = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def unknown(self, text):
        """The characters of text that are not in the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(ch for ch in text if ch not in self.stoi))

    def encode(self, text):
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


MAX_PROMPT_BYTES = 10 * 2**20  # a prompt file holds at most this much: /dev/zero would never end


def read_prompt(prompt):
    """The prompt text; "FILE:path" reads it from a UTF-8 file, as nanoGPT's sample.py does."""
    if not prompt.startswith("FILE:"):
        return prompt
    if not prompt[len("FILE:"):].strip():
        raise UsageError("--prompt FILE: names no file; give --prompt FILE:PATH to a UTF-8 text file")
    path = Path(prompt[len("FILE:"):])
    try:
        with path.open("rb") as f:  # a pipe such as /dev/stdin is read too, up to MAX_PROMPT_BYTES
            raw = f.read(MAX_PROMPT_BYTES + 1)
        if len(raw) > MAX_PROMPT_BYTES:
            raise UsageError(f"the prompt file {path} holds more than {MAX_PROMPT_BYTES:,} bytes; give --prompt "
                             f"FILE:PATH to a shorter UTF-8 text file")
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else e.strerror or type(e).__name__
        raise UsageError(
            f"cannot read the prompt file {path} ({reason}); give --prompt FILE:PATH to a UTF-8 text file"
        ) from None


def encode_prompt(tokenizer, text, device="cpu"):
    """The prompt as a (1, T) tensor of token ids; UsageError naming any character outside the vocabulary."""
    if not text:
        raise UsageError("the prompt is empty; give --prompt at least one character")
    return encode_known(tokenizer, text, "the prompt", "give a --prompt made of characters of the training text",
                        device)[None]


def encode_known(tokenizer, text, what, fix, device="cpu"):
    """text as a tensor of token ids; UsageError naming the characters outside the vocabulary, with what (the
    text as the message names it) and fix."""
    unknown = tokenizer.unknown(text)
    if unknown:
        raise UsageError(f"{what} has characters outside the model's vocabulary: {' '.join(map(repr, unknown))}; "
                         f"{fix}")
    return torch.tensor(tokenizer.encode(text), dtype=torch.long, device=device)


def split(data, train_fraction=0.9):
    """The first train_fraction of the tokens train, the rest validate."""
    n = int(train_fraction * len(data))
    return data[:n], data[n:]


def halves(val_data):
    """The validation tokens cut in two: the first half tunes settings, the second reports ("tune", "test")."""
    n = len(val_data) // 2
    return val_data[:n], val_data[n:]


def check_length(n_train, n_val, block_size):
    """UsageError unless each split (of n_train and n_val tokens) holds a window of block_size + 1 tokens."""
    if min(n_train, n_val) <= block_size:
        raise UsageError(
            f"--data has too little text for block_size {block_size}: {n_train + n_val:,} token(s), {n_train:,} "
            f"for training and {n_val:,} for validation, where each split needs at least block_size + 1; use a "
            f"smaller --block_size or a longer --data text"
        )


class BatchSampler:
    """Random windows of block_size + 1 tokens from each split, drawn from its own generator."""

    def __init__(self, train_data, val_data, block_size, batch_size, device, seed):
        check_length(len(train_data), len(val_data), block_size)
        self.data = {"train": train_data, "val": val_data}
        self.block_size = block_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(block_size + 1)
        self.pin = self.device.type == "cuda"  # pinned memory lets the copy to the GPU run asynchronously

    def get(self, split):
        """A batch (x, y) of shape (batch_size, block_size) where y is x shifted by one."""
        data = self.data[split]
        ix = torch.randint(len(data) - self.block_size, (self.batch_size,), generator=self.generator)
        windows = self.to_device(data[ix[:, None] + self.offsets])  # (B, T+1)
        return windows[:, :-1], windows[:, 1:]

    def to_device(self, windows):
        """windows on the sampler's device: through pinned memory on CUDA while PINNED_BATCHES is on."""
        if self.pin and PINNED_BATCHES.on:
            try:
                return windows.pin_memory().to(self.device, non_blocking=True)
            except Exception as e:  # whatever pinning raised: the plain copy that follows decides
                PINNED_BATCHES.fail(e)
        return windows.to(self.device)
